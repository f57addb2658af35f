"""Namespaces: creating one, and deleting one with its VMs (through ordinary delete jobs)."""

from __future__ import annotations

from orchestrator.control.locks import cmd_lock
from orchestrator.control.submit import Submitting
from orchestrator.model.errors import AlreadyExists, ExecError, InvalidInput, NotFound
from orchestrator.model.names import check_namespace
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job, Namespace, Quota
from orchestrator.store.jobstore import BatchEntry
from orchestrator.store.networks import NetworkRecords


class Namespaces(Submitting):
    # -- namespaces ---------------------------------------------------------------------

    def namespaces(self) -> list[Namespace]:
        return self.store.namespaces()

    def create_namespace(self, name: str, hosts: list[str] | None) -> Namespace:
        check_namespace(name)
        known = {h.name for h in self.store.hosts()}
        unknown = sorted(set(hosts or []) - known)
        if unknown:
            raise InvalidInput(f"unknown host {unknown[0]!r}", hint=f"known hosts: {', '.join(sorted(known))}")
        with self.locks.hold(cmd_lock(name), timeout=self.settings.submit_lock_timeout):
            if self.store.namespace(name) is not None:
                raise AlreadyExists(f"namespace {name!r} already exists", hint="see 'vmorch ns list'")
            return self.store.create_namespace(name, hosts)  # LOCK: cmd

    def set_quota(self, name: str, quota: Quota) -> Namespace:
        """Replace a namespace's limits (0 or None: no limit). Launches already accepted stay; the next
        ones are checked against it, atomically, by the submit script."""
        return self.store.change_namespace_quota(name, quota, replace=True)

    def update_quota(self, name: str, changes: Quota) -> Namespace:
        """Change some of a namespace's limits: each one given is set (0: no limit), the others stay.
        One atomic step on the server (``Store.change_namespace_quota``), so concurrent changes of
        different limits all hold; what comes back is the namespace as this change left it."""
        return self.store.change_namespace_quota(name, changes)

    def delete_namespace(self, name: str, *, force: bool) -> list[Job]:
        """Start deleting a namespace: its VMs go through ordinary delete jobs.

        The cmd lock is held only for the decision; the caller waits for the jobs without
        any lock, then calls ``finish_namespace_delete``.
        """
        with self.locks.hold(cmd_lock(name), timeout=self.settings.submit_lock_timeout):
            info = self.store.namespace(name)
            if info is None:
                raise NotFound(f"no namespace {name!r}", hint="see 'vmorch ns list'")
            scheduled = self.store.schedule_names(name)
            if scheduled:  # they would fire into a namespace that is gone
                raise InvalidInput(f"namespace {name!r} has schedules: {', '.join(scheduled)}",
                                   hint=f"remove them first ('vmorch -n {name} schedule remove NAME')")
            nets = NetworkRecords(self.redis).names(name)
            if nets:  # their gateways are torn down by their hosts' workers, not by a purge of keys
                raise InvalidInput(f"namespace {name!r} has networks: {', '.join(nets)}",
                                   hint=f"delete its VMs, then its networks ('vmorch -n {name} net delete NAME')")
            names = self.store.vm_names(name)
            if names and not force:
                raise InvalidInput(f"namespace {name!r} has {len(names)} VMs",
                                   hint="delete them first, or pass --force to delete them with it")
            self.store.mark_namespace_deleting(name)  # LOCK: cmd -- no launch gets in from now on
            deletes = [Operation.build(Op.DELETE, name, vm) for vm in names]
            _, submitted = self.store.submit_batch([BatchEntry(op) for op in deletes], who=self.actor)
            accepted = list(zip(submitted, deletes, strict=True))
        self._enqueue(accepted)
        return self.store.get_jobs(s.id for s, _ in accepted)

    def finish_namespace_delete(self, name: str) -> int:
        with self.locks.hold(cmd_lock(name), timeout=self.settings.submit_lock_timeout):
            left = self.store.vm_names(name)
            if left:
                raise ExecError(f"namespace {name!r} still has VMs: {', '.join(left[:5])}",
                                hint="see their delete jobs with 'vmorch job list --state failed', then retry")
            return self.store.purge_namespace(name)  # LOCK: cmd

