"""The quiet start drops only the known accelerator-probing lines; anything else still shows."""

import os

from mtkd_jax import quiet


def test_probing_noise_is_dropped_and_a_real_warning_still_shows(capfd):
    with quiet.filtered_native_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n")  # fmt: skip
        os.write(2, b"E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
        os.write(2, b"I1202 xla_bridge.py:849] Unable to initialize backend 'tpu': libtpu.so\n")
        os.write(2, b"W0000 00:00:1 something.cc:1] a real warning about the input\n")
    err = capfd.readouterr().err
    assert err == "W0000 00:00:1 something.cc:1] a real warning about the input\n"


def test_start_quietly_can_be_called_again(capfd):
    quiet.start_quietly()
    quiet.start_quietly()
    for line in capfd.readouterr().err.splitlines():
        assert "cuInit" not in line and "libtpu" not in line and not line.startswith("E0000")
