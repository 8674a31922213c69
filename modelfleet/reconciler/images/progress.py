"""Progress of the image build's long steps: a live rich display on a terminal, one line per step otherwise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


class Reporter:
    """Progress of the long steps (a rich Progress when asked for, otherwise log lines)."""

    def __init__(self, console: Any = None, show: bool = True) -> None:
        self.console = console
        self.show = show
        self._progress: Any = None

    def __enter__(self) -> Reporter:
        if self.show:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.console = self.console or Console(stderr=True)
            if not self.console.is_terminal:  # CI logs: one line per finished step, no live display
                return self
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=self.console, transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        """A step with a live detail line; yields ``update(detail)``."""
        t0 = time.monotonic()
        if self._progress is None:
            try:
                yield lambda detail: None
            except BaseException:
                if self.show and self.console is not None:
                    self.console.print(f"✗ {title} ({time.monotonic() - t0:.1f} s)", markup=False)
                raise
            if self.show and self.console is not None:
                self.console.print(f"✓ {title} ({time.monotonic() - t0:.1f} s)", markup=False)
            return
        task = self._progress.add_task(title, total=None)

        def update(detail: str) -> None:
            detail = detail.strip().replace("[", "\\[")
            if detail:
                self._progress.update(task, description=f"{title} [dim]{detail[:90]}[/dim]")

        try:
            yield update
        except BaseException:
            self._progress.update(task, description=f"[red]✗[/red] {title}", total=1, completed=1)
            raise
        self._progress.update(task, description=f"[green]✓[/green] {title} ({time.monotonic() - t0:.1f} s)",
                              total=1, completed=1)

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
