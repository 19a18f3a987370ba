"""Tier-1 unit tests: pure CPU, no server process."""


def pytest_configure(config):
    # Expected noise: decoding over read-only frames (djinn filters it itself, pytest resets filters)
    # and complex32 being experimental in torch.
    config.addinivalue_line("filterwarnings", "ignore:The given buffer is not writable")
    config.addinivalue_line("filterwarnings", "ignore:ComplexHalf support is experimental")
