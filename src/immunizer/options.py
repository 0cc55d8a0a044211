"""The command-line options several commands share, each concept under one name everywhere:

    --release DIR    an immunize output directory (model/ + manifest.json + canaries)
    --candidate      weights checked against a release (`scan`, `verify`)
    --store URL      the review store (a SQLite file or a PostgreSQL URL)
    --out DIR        the directory a command writes (a single file is `--report FILE`)

The names the commands had before stay accepted so that scripts keep working; `--help` shows only the
current one:

    --manifest (extrapolate, verify, scan), --model (calibrate)   -> --release
    --model (verify)                                             -> --candidate
    --base (scan: the released model, not a base model)          -> --release-model
    --adaptive-manifest (attack)                                 -> --adaptive-release
    --db (review *)                                              -> --store
    --out (eval: a file)                                         -> --report
    --harmful, --safe (compare)                                  -> --n-harmful, --n-safe"""
from __future__ import annotations

import click

STORE_HELP = "The review store: a SQLite file path (created if missing) or postgresql://user@host:port/dbname."
RELEASE_HELP = "An immunize output directory (model/ + manifest.json + canaries.safetensors)."


class Option(click.Option):
    """A click option that also answers to its old names (`old=("--db",)`), which --help leaves out."""

    def __init__(self, param_decls, old: tuple[str, ...] = (), **kwargs):
        super().__init__([*param_decls, *old], **kwargs)
        self.old_names = tuple(old)

    def _current(self, method, *args):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.old_names]
        try:
            return method(*args)
        finally:
            self.opts = opts

    def get_help_record(self, ctx):
        return self._current(super().get_help_record, ctx)

    def get_error_hint(self, ctx):
        return self._current(super().get_error_hint, ctx)


def option(*param_decls, old: tuple[str, ...] = (), **kwargs):
    """`click.option` with hidden old names."""
    return click.option(*param_decls, cls=Option, old=old, **kwargs)


def store_option(help: str = STORE_HELP, **kwargs):
    return option("--store", "store_url", old=("--db",), help=help, **kwargs)


def release_option(help: str = RELEASE_HELP, old: tuple[str, ...] = ("--manifest",), exists: bool = True, **kwargs):
    return option("--release", "release_dir", old=old, type=click.Path(exists=exists, file_okay=False), help=help,
                  **kwargs)
