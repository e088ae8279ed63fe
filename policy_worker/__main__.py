"""``python -m policy_worker``: one policy worker process (``symbi up`` starts them)."""

from policy_worker.cli import main

raise SystemExit(main())
