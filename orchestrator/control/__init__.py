"""Layer 3, control: the submit path (validation, placement, acceptance, wake-up messages), the
lock hierarchy, job dependencies, the Celery queue, reading and waiting for jobs."""
