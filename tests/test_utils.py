import io

from diffusion_from_scratch.utils import progress_bar


def test_progress_bar_redraws_rarely_when_not_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file, not a terminal
    bar = progress_bar(range(3), file=io.StringIO())
    assert bar.mininterval == 30.0 and bar.maxinterval == 30.0
    bar.close()
    bar = progress_bar(range(3), file=io.StringIO(), mininterval=1.0)  # an explicit value wins
    assert bar.mininterval == 1.0
    bar.close()
