"""Running an experiment file as a job graph, and reading its runs."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from orchestrator.control import targets
from orchestrator.control.networks import Networks
from orchestrator.control.reading import Reading
from orchestrator.control.submit import Submitting
from orchestrator.model.errors import InvalidInput, VmorchError
from orchestrator.model.operation import Op, Operation, SubmitOptions
from orchestrator.store.runs import ExperimentRun, RunStep, derive_state

if TYPE_CHECKING:
    from orchestrator.model import experiment


class Experiments(Submitting, Reading, Networks):
    # -- experiments ------------------------------------------------------------------------

    def run_experiment(self, text: str, *, namespace: str, source: str = "",
                       idempotency_key: str | None = None) -> ExperimentRun:
        """Run an experiment file (its YAML text) as a job graph and record the run.

        Each step is accepted whole or not at all; if a later step is refused (a target that
        matches no VM, say), the steps already accepted are canceled before the error is raised.
        With ``idempotency_key``, running it again (a firing redelivered after its scheduler died)
        makes no new job and no new run: each step and the run record have a key derived from it.
        """
        from orchestrator.model import experiment  # imported here: YAML is for experiments only (CLI start-up time)

        exp = experiment.load(text)
        ns = exp.namespace or namespace
        steps: list[RunStep] = []
        made = self._networks(ns, exp)  # before the launches that plug into them
        try:
            if exp.vms:
                launches = [Operation.build(Op.LAUNCH, ns, n, **spec.launch_params())
                            for spec in exp.vms for n in spec.names()]
                steps.append(RunStep(name="launch", kind="launch",
                                     job=self._submit_step(launches, f"{exp.name}: launch",
                                                           SubmitOptions(idempotency_key=_derived(idempotency_key,
                                                                                                  "launch")))))
            ids = {s.name: s.job for s in steps}
            previous = [s.name for s in steps]
            for i, step in enumerate(exp.steps):
                name = experiment.step_name(step, i)
                after = step.after if step.after is not None else previous
                job = self._submit_step(self._step_ops(ns, step), f"{exp.name}: {name}",
                                        SubmitOptions(after=[ids[a] for a in after], delay_s=step.wait_s,
                                                      if_dependency_failed="fail",
                                                      idempotency_key=_derived(idempotency_key, f"step/{i}")))
                steps.append(RunStep(name=name, kind="step", job=job, after=after))
                ids[name], previous = job, [name]
            before_teardown = list(ids.values())
            for i, step in enumerate(exp.teardown_steps()):
                name = experiment.step_name(step, i, "teardown")
                # final, not succeeded: a teardown runs whatever became of the steps before it
                job = self._submit_step(self._step_ops(ns, step), f"{exp.name}: {name}",
                                        SubmitOptions(after_final=before_teardown, delay_s=step.wait_s,
                                                      idempotency_key=_derived(idempotency_key, f"teardown/{i}")))
                steps.append(RunStep(name=name, kind="teardown", job=job, after=list(ids)))
                ids[name] = job
                before_teardown = [*before_teardown, job]
        except VmorchError:
            for s in steps:
                self.cancel(s.job)
            for name in made:
                with contextlib.suppress(VmorchError):
                    self.delete_network(ns, name)
            raise
        teardown = [s.job for s in steps if s.kind == "teardown"]
        for name in made if teardown else []:  # the teardown's last step being final lets them go
            self.net_records.delete_after(ns, name, teardown[-1])
        run_id = self.runs.save(name=exp.name, namespace=ns, source=source, text=text, by=self.actor, steps=steps,
                                idempotency_key=_derived(idempotency_key, "run"))
        return self.experiment_run(run_id)

    def _networks(self, ns: str, exp: experiment.Experiment) -> list[str]:
        """The file's networks, created where missing (and waited for); the names of those it made."""
        from orchestrator.model.network import NetworkSpec

        made: list[str] = []
        try:
            for net in exp.networks:
                spec = NetworkSpec(name=net.name, subnet=net.subnet, dhcp=net.dhcp, nat=net.nat)
                found = self.net_records.get(ns, net.name)
                if found is not None:
                    if (found.subnet, found.dhcp, found.nat) != (spec.subnet, spec.dhcp, spec.nat):
                        raise InvalidInput(f"network {net.name!r} exists with another setup ({found.subnet}, dhcp "
                                           f"{found.dhcp}, nat {found.nat})",
                                           hint="rename the experiment's network, or delete the existing one")
                    continue
                self.create_network(ns, spec)
                made.append(net.name)
            for name in made:
                self.wait_network(ns, name, gone=False, timeout=120)
        except VmorchError:
            for name in made:
                with contextlib.suppress(VmorchError):
                    self.delete_network(ns, name)
            raise
        return made

    def _step_ops(self, ns: str, step: experiment.Step) -> list[Operation]:
        names = targets.resolve(self, ns, step.target, step.tag)
        return [Operation.build(step.op, ns, n, **step.params) for n in names]

    def _submit_step(self, ops: list[Operation], label: str, options: SubmitOptions | None = None) -> int:
        opts = (options or SubmitOptions()).model_copy(update={"parent": True, "label": label})
        parent = self.submit(ops, opts)[0].parent
        assert parent is not None
        return parent

    def experiment_run(self, run_id: int) -> ExperimentRun:
        run = self.runs.get(run_id)
        jobs = self.store.get_jobs(s.job for s in run.steps)
        by_id = {j.id: j for j in jobs}
        return run.model_copy(update={"jobs": {s.name: by_id[s.job] for s in run.steps if s.job in by_id},
                                      "state": derive_state(jobs)})

    def experiment_runs(self, namespace: str, *, limit: int = 20) -> list[ExperimentRun]:
        return [self.experiment_run(i) for i in self.runs.ids(namespace, limit)]


def _derived(key: str | None, part: str) -> str | None:
    return None if key is None else f"{key}/{part}"[:200]
