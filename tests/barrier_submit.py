"""Runs one ``vmorch`` command the moment a Redis barrier opens (used by test_ordering.py).

usage: barrier_submit.py REDIS_URL BARRIER_KEY -- VMORCH ARGS...

Everything is imported and connected before the barrier, so several of these released
together submit at the same moment, as two users would.
"""

from __future__ import annotations

import sys

from redis import Redis

import cli.app

url, barrier = sys.argv[1], sys.argv[2]
argv = sys.argv[sys.argv.index("--") + 1:]
redis = Redis.from_url(url)
redis.rpush(f"{barrier}:ready", 1)
redis.blpop([barrier], timeout=60)
cli.app.main(argv)
