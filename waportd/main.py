"""`waportd`: parse flags, build the config, run the arbiter."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ipc import __version__
from waportd import config, logsetup, process
from waportd.arbiter import Arbiter
from waportd.locks import LockBusy

EXIT_CONFIG = 2
log = logging.getLogger("waport.main")


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
    logsetup.configure("info")  # what goes wrong before the config is read is said in the one format too
    process.raise_fd_limit()
    overrides = {k: getattr(args, k) for k in (
        "state_dir", "run_dir", "backend", "sim_endpoint", "metrics_listen", "redis_url", "companies",
        "log_level")}

    def load() -> config.Config:
        return config.load(args.config, os.environ, overrides)

    try:
        cfg = load()
    except config.ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(EXIT_CONFIG)
    missing = process.missing_for(cfg.backend)
    if missing:
        log.error("%s", missing)
        sys.exit(EXIT_CONFIG)
    logsetup.configure(cfg.log_level)
    arbiter = Arbiter(cfg, reload_config=load)
    try:
        sys.exit(arbiter.run())
    except LockBusy as exc:
        who = f"pid {exc.holder}" if exc.holder else "another process"
        log.error("another waportd (%s) already uses state directory %s (lock %s)", who, cfg.state_dir, exc.path)
        sys.exit(1)
    except PermissionError as exc:
        log.error("%s", exc)
        sys.exit(1)
