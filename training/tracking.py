"""Experiment trackers: ``logger=none`` (log lines only) and ``logger=wandb``.

Only rank 0 creates a tracker; the others get :class:`NoTracker`. The wandb run id is kept in the
checkpoint so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class NoTracker:
    run_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    def __init__(self, logger_cfg, config: dict, run_dir: str, run_id: str | None):
        import wandb

        mode = logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "online"
        self.run = wandb.init(
            project=logger_cfg.project, entity=logger_cfg.get("entity"), name=logger_cfg.get("run_name"),
            group=logger_cfg.get("group"), tags=list(logger_cfg.get("tags") or []), mode=mode,
            dir=run_dir, config=config, id=run_id, resume="allow")  # run_id None: a new run
        self.run_id = self.run.id
        log.info("wandb run %s (mode=%s) in %s", self.run_id, mode, run_dir)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def create_tracker(logger_cfg, config: dict, run_dir: str, run_id: str | None, is_main: bool):
    if not is_main or logger_cfg.name == "none":
        return NoTracker()
    if logger_cfg.name == "wandb":
        return WandbTracker(logger_cfg, config, run_dir, run_id)
    raise ValueError(f"logger.name must be 'none' or 'wandb'; got {logger_cfg.name!r}")
