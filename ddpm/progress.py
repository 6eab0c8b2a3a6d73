"""Progress for terminals and for logs.

On a terminal, a tqdm bar. Anywhere else (``dvc repro``, CI, output redirected to a file) a bar
would append one carriage-return update per refresh to the log, thousands on one line, so a
plain line is printed instead every ``every_fraction`` of the work or every ``every_s``
seconds, whichever comes first, and once at the end::

    train: 1,200/4,000 step (30%), 3.21 step/s, elapsed 0:06:14, ETA 0:14:32, loss=0.0321
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _amount(n: float, unit: str, scale: bool) -> str:
    return f"{tqdm.format_sizeof(n, divisor=1024)}{unit}" if scale else f"{n:,.0f}"


class Progress:
    """``update(n)``, ``set_postfix(**values)`` and ``close()``, as a bar or as plain lines.

    Args:
        total: the amount of work (None when unknown: lines then carry no percentage or ETA).
        initial: work already done (a resumed run), not counted in the rate.
        enabled: False makes every method a no-op (ranks other than 0).
        unit_scale: amounts in bytes, shown as KiB, MiB, ...
        stream: where to write; stderr by default. Its ``isatty()`` picks bar or lines.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled: bool = True,
        unit_scale: bool = False,
        every_fraction: float = 0.05,
        every_s: float = 60.0,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.start_n = self.printed_n = initial
        self.every_fraction, self.every_s = every_fraction, every_s
        self.enabled, self.postfix = enabled, ""
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                unit_divisor=1024, file=self.stream, dynamic_ncols=True, leave=False,
            )  # fmt: skip
        self.t0 = self.printed_t = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        step = self.every_fraction * self.total if self.total else float("inf")
        if self.n - self.printed_n >= step or now - self.printed_t >= self.every_s:
            self._line(now)

    def set_postfix(self, **values: object) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self.bar is not None:
            self.bar.close()
        elif self.n != self.printed_n:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        done, elapsed = self.n - self.start_n, now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        unit = "" if self.unit_scale else f" {self.unit}"
        head = f"{self.desc}: {_amount(self.n, self.unit, self.unit_scale)}"
        if self.total:
            head += f"/{_amount(self.total, self.unit, self.unit_scale)}{unit}"
            head += f" ({100 * self.n / self.total:.0f}%)"
        else:
            head += unit
        speed = _amount(rate, self.unit, self.unit_scale) if self.unit_scale else f"{rate:,.3g}"
        parts = [head, f"{speed}{unit}/s", f"elapsed {_duration(elapsed)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.stream, flush=True)
        self.printed_n, self.printed_t = self.n, now
