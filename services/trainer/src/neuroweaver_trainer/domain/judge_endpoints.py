"""Where an RLAIF job's judge may send prompts, and which key variable may go with them: the trainer's
`--judge-endpoints` allow-list (the shared policy is `neuroweaver_runtime.judge_endpoints`, whose docstring explains
it). The trainer's own settings (`NW_TRAINER_*`) are never a judge key.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroweaver_runtime.judge_endpoints import JudgeEndpoint
from neuroweaver_runtime.judge_endpoints import JudgeEndpoints as _JudgeEndpoints

__all__ = ["JudgeEndpoint", "JudgeEndpoints"]


@dataclass(frozen=True)
class JudgeEndpoints(_JudgeEndpoints):
    SERVICE = "trainer"
    OWN_SETTINGS = "NW_TRAINER_"
