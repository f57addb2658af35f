"""vmorch's host agent: the Celery worker of one host and its libvirt driver."""
