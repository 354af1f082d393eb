from neuroweaver_deployer.adapters.tables import metadata
from neuroweaver_runtime.migrations import run_env

run_env(metadata)
