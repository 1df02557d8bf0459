"""The package's small public surface."""
import subprocess
import sys


def test_public_surface():
    import cacnb
    import cacnb.launch  # noqa: F401  (the submodule import must not shadow the function)

    assert callable(cacnb.launch) and cacnb.launch.__name__ == "launch"
    assert cacnb.load_config("synthetic").name == "synthetic"
    assert cacnb.build_model.__module__ == "cacnb.model"


def test_import_is_cheap():
    out = subprocess.run([sys.executable, "-c", "import cacnb, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
