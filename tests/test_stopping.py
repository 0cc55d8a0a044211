"""A first Ctrl-C or SIGTERM asks for a stop at the next safe point; a second acts as usual."""
import os
import signal

import pytest

from immunizer.stopping import GracefulStop


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_and_the_second_acts(number, capsys):
    before = signal.getsignal(number)
    caught = []
    if number == signal.SIGTERM:  # what SIGTERM does without the guard, observable in a test
        signal.signal(number, lambda n, f: caught.append(n))
    with GracefulStop("the test's piece") as stop:
        assert stop() is None
        os.kill(os.getpid(), number)
        assert stop() == signal.Signals(number).name  # recorded; the work goes on
        assert "stopping after the test's piece" in capsys.readouterr().err
        if number == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), number)
                signal.getsignal(number)  # a bytecode boundary for the handler to run at
        else:
            os.kill(os.getpid(), number)
            assert caught == [number]
    signal.signal(number, before)
    assert signal.getsignal(number) == before
