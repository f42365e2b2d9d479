"""The learner as the driver sees it: a Ray Train `TorchTrainer` running `train_loop.learner_loop`
on W workers for the whole run, a mailbox (an inbox per rank and one outbox), the typed commands of
`learner_protocol`, and replay of the pending command when Ray Train restarts the group."""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import replace

from treegrpo_ray import storage
from treegrpo_ray.actors.learner_protocol import REPLY, Envelope, Export, Failed, Ready, Save, Stop, Update, Updated
from treegrpo_ray.actors.mailbox import Mailbox
from treegrpo_ray.actors.pools import on_driver_node
from treegrpo_ray.actors.train_loop import learner_loop
from treegrpo_ray.config import Config



class LearnerGroup:
    def __init__(self, cfg: Config, cfg_dict: dict, store, resume_from=None):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        lr = cfg.learner
        self.cfg = cfg
        # the mailbox lives on the driver's node (its loss is the run's anyway): a lost learner node
        # takes only the workers, which Ray Train restores
        self.mail = Mailbox(lr.workers, on_driver_node())
        self.seq, self.version, self.pending = 0, 0, None
        self.since_checkpoint: list[tuple[int, Update]] = []  # replayed by a restored group
        self.checkpoint = str(resume_from) if resume_from else None  # newest checkpoint of this run
        self.pid, self.restarts = 0, 0
        res = {"CPU": lr.resources.num_cpus, **lr.resources.resources}
        if lr.resources.num_gpus:
            res["GPU"] = lr.resources.num_gpus
        # the driver resolved output_dir to an absolute path or URI (storage.resolve_output_dir);
        # Ray Train keeps its (pointer-sized) checkpoints beside the run's, through the same pyarrow fs
        train_fs, train_path = storage.filesystem(storage.join(cfg.tracking.output_dir, "ray_train"))
        probe = storage.write_probe(cfg.tracking.output_dir) if storage.is_local(cfg.tracking.output_dir) else None
        self.trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"cfg": cfg_dict, "mail": self.mail, "store": store,
                               "resume_from": self.checkpoint, "probe": probe},
            scaling_config=ScalingConfig(num_workers=lr.workers, use_gpu=lr.resources.num_gpus > 0,
                                         resources_per_worker=res),
            run_config=RunConfig(storage_path=train_path, storage_filesystem=train_fs,
                                 name=f"learner-{os.getpid()}-{int(time.time())}",
                                 # a worker group that cannot start (its node is gone) is retried each
                                 # 60 s (Ray Train's start timeout) for about pools.lost_node_wait_s
                                 failure_config=FailureConfig(
                                     max_failures=max(cfg.pools.max_restarts, 0),
                                     controller_failure_limit=max(1, math.ceil(cfg.pools.lost_node_wait_s / 60)))))
        self.fit_error: BaseException | None = None
        self.fit_thread = threading.Thread(target=self._fit, daemon=True)
        self.fit_thread.start()
        ready = self._wait(Ready)
        self.version, self.pid, self.node = ready.version, ready.pid, ready.node
        if probe is not None:
            storage.delete_file(probe)
        if not ready.sees_outputs:
            self.close()
            raise RuntimeError(storage.unshared_storage_error(cfg.tracking.output_dir, ready.host))

    # -- the commands --------------------------------------------------------------------------------
    def update(self, batch_refs: list, leaf_advantages, iteration: int) -> Updated:
        command, before = Update(list(batch_refs), leaf_advantages, iteration), self.version
        reply = self.run(command)
        self.version = reply.version
        self.since_checkpoint.append((before, command))  # its trees stay in the object store until the next save
        return reply

    def save(self, root: str, iteration: int, run_state: dict, keep: int) -> str:
        self.checkpoint = self.run(Save(str(root), iteration, run_state, keep)).path
        self.since_checkpoint = []
        return self.checkpoint

    def export(self, out_dir: str) -> str:
        return self.run(Export(str(out_dir))).path

    def run(self, command: Update | Save | Export):
        """Send one command to every rank and wait for rank 0's reply. One at a time: the driver
        always waits before the next, so a restarted group has exactly one command to replay."""
        return self._wait(REPLY[type(command)], self._send(command))

    def close(self) -> None:
        self.mail.to_ranks(Stop())
        self.fit_thread.join(timeout=60)

    # -- transport -----------------------------------------------------------------------------------
    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # surfaced to the driver on its next wait
            self.fit_error = e

    def _send(self, command) -> int:
        """Each command names the version and checkpoint a restarted learner must be at to run it."""
        self.seq += 1
        self.pending = Envelope(self.seq, self.version, self.checkpoint, command)
        self.mail.to_ranks(self.pending)
        return self.seq

    def _wait(self, kind: type, seq: int | None = None):
        deadline = time.monotonic() + self.cfg.pools.reply_timeout_s
        while time.monotonic() < deadline:
            if self.fit_error is not None:
                raise RuntimeError(f"the learner (Ray Train) failed: {self.fit_error}") from self.fit_error
            msg = self.mail.reply(timeout=1.0)
            if msg is None:
                if not self.fit_thread.is_alive():
                    raise RuntimeError("the learner (Ray Train) stopped without answering")
                continue
            if isinstance(msg, Failed):
                raise RuntimeError(f"the learner stopped: {msg.error}")
            if isinstance(msg, kind) and (seq is None or msg.seq == seq):
                return msg
            if isinstance(msg, Ready):
                self._restarted(msg)
        raise TimeoutError(f"no {kind.__name__} reply from the learner within {self.cfg.pools.reply_timeout_s:g} s (pools.reply_timeout_s)")

    def _restarted(self, ready: Ready) -> None:
        """Ray Train restarted the group: drop stale copies of the pending command and send it again
        with the updates since the newest checkpoint to replay (a rank that already took it runs it once). The restored ranks catch up to the command's
        version from our newest checkpoint, or answer Failed if the updates since it are lost: we
        stop then rather than rewind silently, and resuming replays them exactly."""
        self.restarts += 1
        self.pid, self.node = ready.pid, ready.node
        print(f"treegrpo_ray: Ray Train restored the learner group (restart {self.restarts}) at weights version "
              f"{ready.version}; the run is at {self.version}: catching up from {self.checkpoint or 'the initial weights'}"
              f" and {len(self.since_checkpoint)} update(s) since it", flush=True)
        self.mail.clear_ranks()
        if self.pending is not None:
            self.pending = replace(self.pending, replay=tuple(self.since_checkpoint))
            self.mail.to_ranks(self.pending)

