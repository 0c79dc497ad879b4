"""Rank-0 progress bar (tqdm): iteration, epoch, loss, images/s and ETA.

Other ranks get a no-op, so the loop calls the same methods everywhere.
"""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, initial: int = 0, rank0: bool = True, bar: bool = True,
                 iters_per_epoch: int = 1) -> None:
        self.iters_per_epoch = max(iters_per_epoch, 1)
        self.rank0 = rank0
        self.bar = None
        if rank0 and bar:
            from tqdm import tqdm

            # Not a terminal (batch job log): redraw rarely so logs stay short.
            mininterval = 0.5 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True,
                            mininterval=mininterval, file=sys.stderr, desc="train")

    def update(self, iteration: int, loss: float | None = None, images_per_s: float | None = None,
               lr: float | None = None) -> None:
        if self.bar is None:
            return
        post = {"ep": f"{iteration / self.iters_per_epoch:.2f}"}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if images_per_s is not None:
            post["img/s"] = f"{images_per_s:.0f}"
        if lr is not None:
            post["lr"] = f"{lr:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(iteration - self.bar.n)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar (rank 0 only)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        elif self.rank0:
            print(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
