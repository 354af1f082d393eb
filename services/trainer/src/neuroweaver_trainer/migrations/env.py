from neuroweaver_runtime.migrations import run_env
from neuroweaver_trainer.adapters.tables import metadata

run_env(metadata)
