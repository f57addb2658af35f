"""How long the local cluster waits for what, in seconds."""

READY_TIMEOUT = 60.0  # up --detach: every host must heartbeat within this
DOWN_TIMEOUT = 60.0  # down: the supervisor must have stopped everything within this
WORKER_STOP_TIMEOUT = 20.0  # Celery's warm shutdown finishes running operations first
REDIS_START_TIMEOUT = 10.0
DOMAINS_STOP_TIMEOUT = 60.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 30.0  # a child that ran this long restarts with the minimum backoff again
POLL = 0.25
