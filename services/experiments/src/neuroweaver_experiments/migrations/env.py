from neuroweaver_experiments.adapters.tables import metadata
from neuroweaver_runtime.migrations import run_env

run_env(metadata)
