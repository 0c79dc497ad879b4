"""The training driver of ``hpcsgd train``: build, then step / evaluate / checkpoint, then finish.

    mpiexec -n 2 hpcsgd train jobs/configs/fashion_mnist.yaml --out runs/fmnist
    mpiexec -n 4 -env HPCSGD_RANKS_PER_NODE 2 hpcsgd train CONFIG.yaml --out DIR --resume auto
    srun --mpi=pmix hpcsgd train jobs/configs/akiba32k.yaml --out $SCRATCH/akiba

:func:`train` is the whole story: :func:`~hpcsgd.train.build.build_run` sets
everything up, :meth:`Run.resume` loads a checkpoint if asked, :meth:`Run.fit`
loops over iterations (:meth:`Run.step`; every ``log_interval`` one small
Allgather of phase timings and one Allreduce of the gradient noise scale's
norms; :meth:`Run.evaluate` every ``eval_interval`` epochs; :meth:`Run.checkpoint`
every ``checkpoint_interval`` iterations), and
:meth:`Run.finish` writes the final evaluation, checkpoint, ``model.npz``,
``summary.json``, ``curves.png`` and the timeline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import chainer
import chainer.functions as F
import numpy as np

from hpcsgd.models import prepare_for_eval
from hpcsgd.models.eval_stats import start_step
from hpcsgd.train import checkpoint as ckpt
from hpcsgd.train.build import build_run, make_loader
from hpcsgd.train.evaluate import evaluate
from hpcsgd.train.metrics import COMM_PHASES, PhaseMeter, plot_curves, versions, write_json
from hpcsgd.train.noise_scale import NoiseScale
from hpcsgd.train.progress import Progress
from hpcsgd.train.skipped import SkippedFiles, gather_skipped


def train(cfg: dict, out: str, resume: str | None = None, timeline: str | None = None,
          timeline_iters: range | None = None) -> dict:
    """Train as configured (``cfg`` resolved by :func:`hpcsgd.train.config.resolve`); returns the summary."""
    t_start = time.perf_counter()
    run = build_run(cfg, out, resume=bool(resume), timeline=timeline, timeline_iters=timeline_iters)
    try:
        run.resume(resume)
        run.fit()
        return run.finish(t_start, timeline)
    finally:
        run.close()


def accumulate_gradients(model, stream, accum: int, optimizer, tracer,
                         loss_fn=F.softmax_cross_entropy, after_backward=None) -> float:
    """Forward + backward of ``accum`` micro-batches from ``stream``; returns the step's mean loss.

    Each micro-batch's mean loss is scaled by ``1/accum`` before backward and
    the gradients add up, so with equal micro-batches the result is exactly
    the gradient of the mean loss over their concatenation, i.e. of the
    ``accum``-times larger batch (tested). The one difference is BN: it
    normalizes each micro-batch with that micro-batch's statistics, as if
    every micro-batch were its own worker (the papers' per-worker BN);
    'batch'-mode BN keeps the statistics of all micro-batches of the step.
    Communication overlapped with backward counts as communication, not backward.
    ``after_backward(micro, accum)``, if given, runs after each micro-batch's
    backward (the noise scale's local norms; traced as ``noise_scale``).
    """
    model.cleargrads()
    start_step(model)
    loss_value = 0.0
    for micro in range(accum):
        with tracer.span("data_wait"):
            x, t = next(stream)
        with tracer.span("forward"):
            loss = loss_fn(model(x), t)
        with tracer.span_excluding("backward", COMM_PHASES), \
                optimizer.backward_scope(last=micro == accum - 1):
            (loss / accum if accum > 1 else loss).backward()  # no Div node (exact) at accum 1
        if after_backward is not None:
            with tracer.span("noise_scale"):
                after_backward(micro, accum)
        loss_value += float(loss.array) / accum
    return loss_value


def device_seed(seed: int, rank: int, iteration: int) -> int:
    """Seed of the GPU's RNG for ``iteration`` on ``rank``: a function of nothing else.

    CuPy's generator state cannot be checkpointed, so the driver reseeds it before
    every step: a resumed run draws exactly what the uninterrupted run drew.
    """
    return int(np.random.SeedSequence([int(seed), int(rank), int(iteration), 0xC0FA]).generate_state(1)[0])


@dataclass
class Run:
    """One rank's training run: its parts (built by :func:`~hpcsgd.train.build.build_run`) and state."""

    cfg: dict
    out: str
    comm: object
    topology: dict
    tracer: object
    device: int | None
    log: object
    train_set: object
    val_set: object
    loader: object
    val_loader: object
    model: object
    loss_fn: object
    recipe: object
    optimizer: object
    iters_per_epoch: int
    total_iters: int
    iteration: int = 0
    history: list = field(default_factory=list)
    skipped: SkippedFiles = field(default_factory=SkippedFiles)
    device_random: object = None  # cupy.random on GPU (reseeded per step), else None
    train_seconds: float = 0.0
    meter: PhaseMeter = field(default_factory=PhaseMeter)
    noise: NoiseScale | None = None  # gradient noise scale tracker (None: not measured, see noise_reason)
    noise_reason: str | None = None

    def __post_init__(self):
        self.rank, self.size = self.comm.rank, self.comm.size
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        if self.device is not None and self.device_random is None:
            import cupy

            self.device_random = cupy.random
        self._stream, self._stream_epoch = None, -1

    def epoch(self, iteration: int | None = None) -> float:
        return (self.iteration if iteration is None else iteration) / self.iters_per_epoch

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[hpcsgd] {text}", flush=True)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> None:
        """Iterate up to ``stop_iteration`` (or the end); evaluation and checkpoints between steps."""
        cfg, accum = self.cfg, self.cfg["grad_accumulation"]
        stop = min(self.total_iters, cfg["stop_iteration"] or self.total_iters)
        eval_every = max(1, round(cfg["eval_interval"] * self.iters_per_epoch)) if cfg["eval_interval"] else 0
        self.say(f"{self.size} ranks on {self.topology.get('nodes', '?')} node(s), {cfg['model']} on "
                 f"{cfg['dataset']}: global batch {cfg['global_batch']} = {self.size} x "
                 f"{cfg['batch_per_rank']} x {accum}, {self.iters_per_epoch} iterations/epoch, "
                 f"{self.total_iters} iterations")
        self.progress = Progress(self.total_iters, initial=self.iteration, rank0=self.rank == 0,
                                 bar=cfg["progress"], iters_per_epoch=self.iters_per_epoch)
        self.meter = PhaseMeter()  # its clock starts with the loop, after any resume
        t_loop, paused_total = time.perf_counter(), 0.0
        while self.iteration < stop:
            loss_value = self.step()
            if self.iteration % cfg["log_interval"] == 0 or self.iteration == stop:
                self.log_train(loss_value)
            t_pause = time.perf_counter()
            if eval_every and self.iteration % eval_every == 0 and self.iteration < self.total_iters:
                self.evaluate()
            if cfg["checkpoint_interval"] and self.iteration % cfg["checkpoint_interval"] == 0 \
                    and self.iteration < stop:
                self.checkpoint()
            paused = time.perf_counter() - t_pause  # evaluation and checkpoints: not training throughput
            self.meter.exclude(paused)
            paused_total += paused
        self.train_seconds = time.perf_counter() - t_loop - paused_total
        self.progress.close()
        if hasattr(self.optimizer, "finalize"):
            self.optimizer.finalize()  # double buffering: no reduction left in flight

    def step(self) -> float:
        """One optimizer step (``grad_accumulation`` micro-batches); returns this rank's mean loss."""
        epoch_index = self.iteration // self.iters_per_epoch
        if self._stream is None or self._stream_epoch != epoch_index:
            self.loader.set_epoch(epoch_index)  # same epoch as a restored loader state: keeps its position
            self._stream, self._stream_epoch = iter(self.loader), epoch_index
        if self.device_random is not None:
            self.device_random.seed(device_seed(self.cfg["seed"], self.rank, self.iteration))
        self.tracer.start_iteration(self.iteration)
        self.recipe.on_iteration(self.epoch())
        noise = self.noise
        loss_value = accumulate_gradients(self.model, self._stream, self.cfg["grad_accumulation"],
                                          self.optimizer, self.tracer, self.loss_fn,
                                          after_backward=noise.local.after_backward if noise else None)
        self.optimizer.update()  # traces pack/allreduce/unpack (communicator) and update (optimizer)
        if noise is not None:
            noise.end_step()
        self.iteration += 1
        images = self.cfg["batch_per_rank"] * self.cfg["grad_accumulation"]
        self.meter.add(self.tracer.pop_phases(), loss_value, images)
        return loss_value

    def log_train(self, loss_value: float) -> None:
        """Aggregate the interval's timings and loss across ranks (collective); log and show them."""
        rec = self.meter.aggregate(self.comm)
        lr = self.recipe.hyperparams(self.epoch()).get("lr")
        rec.update(kind="train", iteration=self.iteration, epoch=self.epoch(), lr=lr,
                   skipped_steps=int(getattr(self.optimizer, "skipped_steps", 0)))
        entry = {k: rec[k] for k in ("kind", "iteration", "epoch", "loss", "lr", "images_per_s")}
        if self.noise is not None:
            rec["noise_scale"] = self.noise.aggregate(self.comm)
            entry.update({k: rec["noise_scale"].get(k) for k in ("b_noise", "b_noise_raw")})
        self.history.append(entry)
        self.log.write("train", local_loss=loss_value, **{k: v for k, v in rec.items() if k != "kind"})
        self.log_skipped()
        self.progress.update(self.iteration, rec["loss"], rec["images_per_s"], lr)

    def log_skipped(self) -> None:
        """Name in this rank's log the files skipped (``on_bad: skip``) since the last record."""
        self.skipped.update("train", self.loader.skipped_files)
        self.skipped.update("val", self.val_loader.skipped_files)
        for role, names in self.skipped.new_since_logged().items():
            self.log.write("skipped", role=role, iteration=self.iteration, files=names)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Top-1/top-5/loss on the whole validation set (collective); BN statistics made ready first."""
        recompute = None
        if self.cfg["bn_mode"] == "recompute":
            recompute = make_loader(self.cfg, self.train_set, self.comm, self.device, "recompute")
        try:
            prepare_for_eval(self.model, self.comm, batches=recompute)
        finally:
            if recompute is not None:
                self.skipped.add("bn_recompute", recompute.skipped_files)
                recompute.close()
        result = evaluate(self.model, self.val_loader, self.comm, n_total=len(self.val_set))
        rec = {"kind": "eval", "iteration": self.iteration, "epoch": self.epoch(), **result}
        self.history.append(rec)
        self.log.write("eval", **{k: v for k, v in rec.items() if k != "kind"})
        self.log_skipped()
        self.progress.write(f"[hpcsgd] iteration {self.iteration} epoch {rec['epoch']:.2f}: "
                            f"val top-1 {100 * rec['top1']:.2f}% top-5 {100 * rec['top5']:.2f}% "
                            f"loss {rec['loss']:.4f} ({rec['samples']} images)")
        return rec

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save a checkpoint of this iteration (collective; verifies the replicas agree)."""
        it = self.iteration
        with self.tracer.span("checkpoint", iteration=it):
            arrays = {**ckpt.to_arrays("model", self.model),
                      **ckpt.to_arrays("optimizer", self.recipe.optimizer)}
            meta = {"iteration": it, "epoch": self.epoch(), "config": self.cfg, "world_size": self.size,
                    "history": self.history}
            self.skipped.update("val", self.val_loader.skipped_files)
            rank_state = {"rng": ckpt.capture_rng(), "loader": self.loader.state_dict(),
                          "bn": ckpt.rank_local_bn_stats(self.model), "skipped": self.skipped.state_dict()}
            ckpt.save_checkpoint(self.ckpt_dir, {"iteration": it, "arrays": arrays, "meta": meta,
                                                 "model": self.model, "rank_state": rank_state},
                                 self.comm, keep=self.cfg["keep_checkpoints"])
        self.log.write("checkpoint", iteration=it)

    def resume(self, resume: str | None) -> None:
        """Load the newest good checkpoint of ``resume`` (a directory, or ``auto``: our own) if any.

        Replicas stay identical: the optimizer wrapper broadcast rank 0's parameters at setup,
        and a resume loads the same bytes on every rank.
        """
        source = self.ckpt_dir if resume == "auto" else resume
        if source and os.path.isdir(os.path.join(source, "checkpoints")):
            source = os.path.join(source, "checkpoints")  # --resume OTHER_OUT_DIR
        if not source:
            return
        state = ckpt.load_for_resume(source, self.comm, log=print if self.rank == 0 else (lambda _m: None))
        if state is None:
            if resume != "auto":
                raise FileNotFoundError(f"--resume {resume}: no good checkpoint in {source}")
            return
        ckpt.from_arrays("model", self.model, state.arrays)
        ckpt.from_arrays("optimizer", self.recipe.optimizer, state.arrays)
        self.iteration, self.history = state.iteration, state.meta.get("history", [])
        if len(state.rank_states) == self.size:
            mine = state.rank_states[self.rank]
            ckpt.restore_rng(mine["rng"])
            self.loader.load_state_dict(mine["loader"])
            ckpt.restore_bn_stats(self.model, mine["bn"])
            self.skipped.load_state_dict(mine.get("skipped", {}))
            self.skipped.update("train", self.loader.skipped_files)
            self.skipped.mark_logged()  # named in the log before the interruption
        else:
            self.say(f"checkpoint was written by {len(state.rank_states)} ranks, now {self.size}: data "
                     f"order restarts within epoch {self.iteration // self.iters_per_epoch}; files "
                     "skipped before are not carried over")
        self.say(f"resumed from {state.path} at iteration {self.iteration}")

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, t_start: float, timeline: str | None = None) -> dict:
        """Final evaluation (if the run completed), checkpoint, model, summary, curves, timeline."""
        completed = self.iteration >= self.total_iters
        final = self.evaluate() if completed else None
        self.checkpoint()
        if self.rank == 0:
            chainer.serializers.save_npz(os.path.join(self.out, "model.npz"), self.model)
        summary = self.summary(completed, final, t_start)
        if timeline:
            self.tracer.write(timeline, comm=self.comm.mpi_comm)
        if self.rank == 0:
            write_json(os.path.join(self.out, "summary.json"), summary)
            plot_curves(self.history, os.path.join(self.out, "curves.png"),
                        title=f"{self.cfg['model']} on {self.cfg['dataset']}")
            skipped = summary["skipped_files"]
            if skipped["count"]:
                self.say(f"skipped {skipped['count']} bad samples in {len(skipped['files'])} files "
                         f"(on_bad: skip), e.g. {', '.join(skipped['files'][:3])}; all in summary.json")
        ended = {k: summary[k] for k in ("iterations", "top1", "top5", "images_per_s", "wall_seconds")}
        self.log.write("end", **ended, skipped_files=summary["skipped_files"]["count"])
        return summary

    def summary(self, completed: bool, final: dict | None, t_start: float) -> dict:
        """summary.json's content (collective: phase means and skipped files come from all ranks)."""
        cfg, done_iters = self.cfg, self.meter.total_iters
        phases = self.meter.run_means_across(self.comm)
        self.log_skipped()
        return {
            "completed": completed, "iterations": self.iteration, "total_iterations": self.total_iters,
            "epochs": self.epoch(), "iterations_this_run": done_iters,
            "top1": final["top1"] if final else None, "top5": final["top5"] if final else None,
            "images_per_s": (done_iters * cfg["global_batch"] / self.train_seconds
                             if self.train_seconds > 0 else 0.0),
            "train_seconds": self.train_seconds, "wall_seconds": time.perf_counter() - t_start,
            "phase_mean_s": phases["mean"], "phase_max_s": phases["max"],
            "skipped_steps": int(getattr(self.optimizer, "skipped_steps", 0)),
            "skipped_files": gather_skipped(self.comm, self.skipped),
            "config": cfg, "topology": self.topology, "versions": versions(), "loadavg": os.getloadavg(),
            "noise_scale": self.noise_summary(),
            "history": self.history,
        }

    def noise_summary(self) -> dict:
        """summary.json's noise-scale entry: the run's last smoothed estimate (collective when measured)."""
        if self.noise is None:
            return {"measured": False, "reason": self.noise_reason}
        rec = self.noise.aggregate(self.comm)
        keep = ("b_noise", "grad_sq", "trace_sigma", "b_small", "b_big", "steps")
        return {"measured": True, **{k: rec.get(k) for k in keep}, "ema_decay": self.noise.decay,
                "local_norms": type(self.noise.local).__name__}

    def close(self) -> None:
        self.log.close()
        self.loader.close()
        self.val_loader.close()
