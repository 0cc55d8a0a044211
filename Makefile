# Two commands for a fresh machine: `make demo` (immunize the embedded model and show what
# changed) and `make test`. Both build the repo-local virtualenv .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
# Keep caches (converted model, teacher generations) inside the repo unless told otherwise.
export IMMUNIZER_CACHE ?= $(CURDIR)/.cache/immunizer
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Playwright drives Debian's /usr/bin/chromium; it must never fetch a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: demo test test-fast venv bench clean system-packages

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU build of torch: any other spec pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The review tests start a throwaway PostgreSQL server and drive a real Chromium: both come
# from Debian and are installed only when missing (as root; elsewhere install them yourself).
system-packages:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: postgresql chromium"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql chromium >/dev/null; \
	  else \
	    echo "warning: the review tests need PostgreSQL and Chromium: sudo apt-get install postgresql chromium"; \
	  fi; \
	fi

demo: $(STAMP)
	@if [ -f $(DEMO_OUT)/checkpoint/state.pt ]; then \
	  $(BIN)/immunizer immunize --model smollm2 --out $(DEMO_OUT) --preset quick --resume; \
	elif [ ! -f $(DEMO_OUT)/manifest.json ]; then \
	  $(BIN)/immunizer immunize --model smollm2 --out $(DEMO_OUT) --preset quick; \
	fi
	$(BIN)/immunizer verify --release $(DEMO_OUT)
	$(BIN)/immunizer compare --before smollm2 --after $(DEMO_OUT)

# One pytest worker per core (pytest-xdist; a file's tests stay on one worker, so its module fixtures are built
# once), each torch on one thread. 418 tests in 7.3 minutes on a quiet 2-core machine (2026-12-01).
# PYTEST_ARGS adds options; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto
test: $(STAMP) system-packages
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP) system-packages
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
