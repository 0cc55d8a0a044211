"""The feedback-to-training loop (MISSION §4): select adjudicated, consented review items, refresh the
training data and the post-training models from them, immunize the next candidate, check it with the
harness and let a versioned policy decide whether it ships.

- `policy.py`: the release policy YAML (versioned thresholds over `report.json`);
- `gate.py`: the gate itself, report + policy (+ the last release's report) → PASS/FAIL with reasons;
- `select.py`, `dedup.py`, `heldout.py`: which review items become training data (never an evaluation
  prompt), de-duplicated, with provenance and a manifest;
- `refresh.py`: the data files the next cycle trains on; `post_training.py`: SFT and reward-model refresh;
- `releases.py`: the release directory and its `current.json` pointer; `cycle.py`: one turn of the loop.
"""
