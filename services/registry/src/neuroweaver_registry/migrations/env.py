from neuroweaver_registry.adapters.tables import metadata
from neuroweaver_runtime.migrations import run_env

run_env(metadata)
