"""Configuration: the TOML file, INFERLINE_* environment overrides, errors that name their key, device strings, and
how replicas are placed on devices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inferline.server.config import ConfigError, Settings, spec_from_env
from inferline.server.worker import device

TOML = """
model_store = "store"
state_dir = "state"

[gateway]
host = "0.0.0.0"
port = 9100
max_body_bytes = 65536

[models.cnn]
replicas = 2
device = "auto"
max_batch_size = 16
max_batch_delay_ms = 2.5

[models.lstm]
device = "cuda:1"
timeout_s = 5

[models.echo]
model = "tests.runtimes:Echo"
options = { scale = 2 }
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No INFERLINE_* or REDIS_URL from outside, and no ./inferline.toml: each test sets what it reads."""
    for key in list(os.environ):
        if key.startswith("INFERLINE_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("INFERLINE_CONFIG", "")   # registered, so the path Settings.load() writes is undone
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "inferline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    return str(info.value)


def test_toml_is_read(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, TOML, "deploy.toml"))
    assert settings.redis_url is None
    assert settings.model_store == Path("store") and settings.state_dir == Path("state")
    assert (settings.gateway.host, settings.gateway.port, settings.gateway.max_body_bytes) == ("0.0.0.0", 9100, 65536)
    assert sorted(settings.models) == ["cnn", "echo", "lstm"]
    cnn, lstm, echo = settings.models["cnn"], settings.models["lstm"], settings.models["echo"]
    assert (cnn.name, cnn.replicas, cnn.device, cnn.max_batch_size, cnn.max_batch_delay_ms) == ("cnn", 2, "auto", 16,
                                                                                                2.5)
    assert cnn.artifact == Path("store") / "cnn" and cnn.model is None   # the store's model by default
    # max_batch_size None: the Model class's own default
    assert (lstm.replicas, lstm.device, lstm.timeout_s, lstm.max_batch_size) == (1, "cuda:1", 5.0, None)
    assert echo.model == "tests.runtimes:Echo" and echo.options == {"scale": 2}
    assert echo.artifact == Path("store") / "echo"   # read only where it exists


def test_defaults_without_a_file(tmp_path: Path) -> None:
    settings = Settings.load()
    assert settings.models == {} and settings.gateway.port == 8000 and settings.redis_url is None


def test_inferline_toml_in_the_working_directory_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.delenv("INFERLINE_CONFIG")
    write(tmp_path, "[models.cnn]\nreplicas = 3\n")
    assert Settings.load().models["cnn"].replicas == 3


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, TOML)
    monkeypatch.setenv("INFERLINE_MODELS__CNN__REPLICAS", "5")
    monkeypatch.setenv("INFERLINE_MODELS__LSTM__DEVICE", "cpu")
    monkeypatch.setenv("INFERLINE_GATEWAY__PORT", "9200")
    monkeypatch.setenv("INFERLINE_MODEL_STORE", "/srv/models")
    monkeypatch.setenv("REDIS_URL", "redis://redis.internal:6380/2")
    settings = Settings.load(path)
    cnn = settings.models["cnn"]
    assert cnn.replicas == 5
    assert cnn.max_batch_size == 16 and cnn.device == "auto"            # the rest of the file's cnn table stays
    assert settings.models["lstm"].device == "cpu" and settings.models["lstm"].timeout_s == 5.0
    assert settings.gateway.port == 9200 and settings.gateway.host == "0.0.0.0"
    assert settings.model_store == Path("/srv/models") and cnn.artifact == Path("/srv/models/cnn")
    assert settings.redis_url == "redis://redis.internal:6380/2"


def test_inferline_redis_url_and_a_model_only_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setenv("INFERLINE_REDIS_URL", "redis://127.0.0.1:7000/0")
    monkeypatch.setenv("INFERLINE_MODELS__SENTIMENT__REPLICAS", "2")
    settings = Settings.load(write(tmp_path, TOML))
    assert settings.redis_url == "redis://127.0.0.1:7000/0"
    assert settings.models["sentiment"].replicas == 2 and settings.models["sentiment"].name == "sentiment"


@pytest.mark.parametrize(("toml", "key"), [
    ("[models.cnn]\nreplicas = -1\n", "models.cnn.replicas"),
    ("[models.cnn]\nreplicas = \"two\"\n", "models.cnn.replicas"),
    ("[models.cnn]\ndevice = \"gpu\"\n", "models.cnn.device"),
    ("[models.cnn]\nmax_batch_size = 0\n", "models.cnn.max_batch_size"),
    ("[models.cnn]\nmax_batch_delay_ms = -5\n", "models.cnn.max_batch_delay_ms"),
    ("[models.cnn]\ntimeout_s = 0\n", "models.cnn.timeout_s"),
    ("[models.cnn]\nreplica = 2\n", "models.cnn.replica"),                 # a typo is an error, not ignored
    ("[models.cnn]\nname = \"lstm\"\n", "models.cnn.name"),
    ("[gateway]\nport = 70000\n", "gateway.port"),
    ("[gateway]\nmax_body_bytes = 10\n", "gateway.max_body_bytes"),
    ("[gateway]\nprot = 80\n", "gateway.prot"),
    ("[gateway]\nbody_timeout_s = 0\n", "gateway.body_timeout_s"),
    ("[gateway]\naccess_log_max_bytes = 100\n", "gateway.access_log_max_bytes"),
    ("[gateway]\nmax_connections = 100\n", "gateway.max_connections_per_client"),   # the default share, 256
    ("[gateway]\nmax_connections_per_client = 10\n", "gateway.max_idle_connections_per_client"),   # default 32
    ("modles = 1\n", "modles"),
])
def test_bad_values_fail_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path, toml)
    message = load_error(path)
    assert key in message, message
    assert str(path) in message


def test_bad_environment_value_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLINE_MODELS__CNN__MAX_BATCH_SIZE", "lots")
    message = load_error(write(tmp_path, TOML))
    assert "models.cnn.max_batch_size" in message and "lots" in message


def test_unreadable_files(tmp_path: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "missing.toml")
    broken = write(tmp_path, "[models.cnn\nreplicas = 1\n")
    assert str(broken) in load_error(broken)


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:0", "cuda:12", "auto"])
def test_device_strings_accepted(tmp_path: Path, value: str) -> None:
    settings = Settings.load(write(tmp_path, f'[models.cnn]\ndevice = "{value}"\n'))
    assert settings.models["cnn"].device == value


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda0", "cpu ", "", "mps", "cuda:0,1"])
def test_device_strings_refused(tmp_path: Path, value: str) -> None:
    message = load_error(write(tmp_path, f'[models.cnn]\ndevice = "{value}"\n'))
    assert "models.cnn.device" in message and "cuda:N" in message


def test_worker_spec_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert spec_from_env() is None
    monkeypatch.setenv("INFERLINE_MODEL_SPEC", json.dumps({"name": "cnn", "artifact": "/m/cnn", "replicas": 2}))
    spec = spec_from_env()
    assert spec is not None and spec.name == "cnn" and spec.artifact == Path("/m/cnn") and spec.replicas == 2
    monkeypatch.setenv("INFERLINE_MODEL_SPEC", json.dumps({"name": "cnn", "device": "tpu"}))
    with pytest.raises(ConfigError, match="device"):
        spec_from_env()


# Placement -----------------------------------------------------------------------------------------------------------

def test_auto_spreads_replicas_round_robin_over_the_gpus() -> None:
    assert [device.resolve("auto", r, gpus=2) for r in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [device.resolve("auto", r, gpus=3) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert [device.resolve("auto", r, gpus=1) for r in range(3)] == ["cuda:0"] * 3
    assert [device.resolve("auto", r, gpus=0) for r in range(3)] == ["cpu"] * 3   # no GPU: the CPU


def test_explicit_devices() -> None:
    assert device.resolve("cpu", 3, gpus=4) == "cpu"
    assert device.resolve("cpu", 0, gpus=0) == "cpu"
    assert device.resolve("cuda", 5, gpus=2) == "cuda:0"      # pinned: every replica on that GPU
    assert device.resolve("cuda:1", 0, gpus=2) == "cuda:1"
    for spec, gpus in (("cuda", 0), ("cuda:2", 2), ("cuda:0", 0)):
        with pytest.raises(ValueError, match="GPU"):
            device.resolve(spec, 0, gpus=gpus)


@pytest.mark.parametrize(("visible", "count"), [("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0, 2 ,5", 3)])
def test_visible_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, visible: str, count: int) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert device.visible_gpus() == count
    assert device.resolve("auto", count + 1) == (f"cuda:{(count + 1) % count}" if count else "cpu")
