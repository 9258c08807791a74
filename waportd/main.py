"""`waportd`: parse flags, build the config, run the arbiter."""

from __future__ import annotations

import argparse
import os
import sys

from ipc import __version__
from waportd import config, logsetup, process
from waportd.arbiter import Arbiter
from waportd.locks import LockBusy

EXIT_CONFIG = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="waportd", description="Supervise one WhatsApp worker per company.")
    p.add_argument("--config", help=f"TOML config file (default {config.DEFAULT_PATH})")
    p.add_argument("--state-dir")
    p.add_argument("--run-dir")
    p.add_argument("--backend", choices=("neonize", "sim"))
    p.add_argument("--sim-endpoint")
    p.add_argument("--metrics-listen")
    p.add_argument("--redis-url")
    p.add_argument("--company", action="append", dest="companies", metavar="COMPANY",
                   help="start this company at boot (repeatable; replaces the config's list)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--version", action="version", version=f"waportd {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    process.raise_fd_limit()
    overrides = {k: getattr(args, k) for k in (
        "state_dir", "run_dir", "backend", "sim_endpoint", "metrics_listen", "redis_url", "companies",
        "log_level")}

    def load() -> config.Config:
        return config.load(args.config, os.environ, overrides)

    try:
        cfg = load()
    except config.ConfigError as exc:
        print(f"waportd: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    missing = process.missing_for(cfg.backend)
    if missing:
        print(f"waportd: {missing}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    logsetup.configure(cfg.log_level)
    arbiter = Arbiter(cfg, reload_config=load)
    try:
        sys.exit(arbiter.run())
    except LockBusy as exc:
        who = f"pid {exc.holder}" if exc.holder else "another process"
        print(f"waportd: another waportd ({who}) already uses state directory {cfg.state_dir} "
              f"(lock {exc.path})", file=sys.stderr)
        sys.exit(1)
    except PermissionError as exc:
        print(f"waportd: {exc}", file=sys.stderr)
        sys.exit(1)
