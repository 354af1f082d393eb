"""`python -m neuroweaver_trainer.worker`: how the local executor and the Kubernetes Job start a worker."""

from . import main

main()
