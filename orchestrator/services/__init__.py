"""Layer 4, services built on the submit path: experiments, schedules and the scheduler process,
and ``client.RedisClient``, the whole client assembled from its parts."""
