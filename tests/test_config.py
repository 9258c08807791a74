import pytest

from waportd import config
from waportd.config import ConfigError


def write(tmp_path, text):
    path = tmp_path / "waportd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_when_the_default_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load(None, environ={})
    assert cfg.state_dir == "/var/lib/waport" and cfg.restart_base_delay == 5 and cfg.max_restarts == 10
    assert cfg.backend == "neonize" and cfg.companies == ()


def test_a_named_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(str(tmp_path / "nope.toml"), environ={})


def test_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, 'backend = "sim"\ncompanies = ["a", "b"]\nrestart_base_delay = "500ms"\n'
                           'memory_limit = "512MiB"\nstop_timeout = "2m"\n')
    cfg = config.load(path, environ={"WAPORT_COMPANIES": "c,d", "WAPORT_MAX_RESTARTS": "3"})
    assert cfg.backend == "sim" and cfg.companies == ("c", "d") and cfg.max_restarts == 3
    assert cfg.restart_base_delay == 0.5 and cfg.memory_limit == 512 * 1024**2 and cfg.stop_timeout == 120
    cfg = config.load(path, environ={"WAPORT_COMPANIES": "c"}, overrides={"companies": ["e"], "backend": None})
    assert cfg.companies == ("e",) and cfg.backend == "sim"


@pytest.mark.parametrize(
    "text,match",
    [
        ("restart_base_dely = 5\n", "unknown key"),
        ('backend = "whatsapp"\n', "backend"),
        ('companies = ["ok", "not ok"]\n', "invalid company id"),
        ('stop_timeout = "soon"\n', "stop_timeout"),
        ("restart_jitter = 1.5\n", "restart_jitter"),
        ("max_restarts = -1\n", "max_restarts"),
        ("heartbeat_interval = 0\n", "heartbeat_interval"),
        ("worker_nice = 20\n", "worker_nice: must be between 0 and 19"),
        ('http_listen = "8480"\n', "http_listen '8480': expected host:port"),
        ('http_listen = "localhost:http"\n', "http_listen"),
        ("http_listen = 8480\n", "http_listen: expected a string"),
        ("max_companies = 0\n", "max_companies: must be a whole number >= 1"),
        ('max_companies = "many"\n', "max_companies"),
        ('worker_nice = "low"\n', "worker_nice"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, text), environ={})


def test_bad_env_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="restart_factor"):
        config.load(write(tmp_path, ""), environ={"WAPORT_RESTART_FACTOR": "fast"})


def test_http_api_keys(tmp_path):
    cfg = config.load(write(tmp_path, ""), environ={})
    assert cfg.http_listen == "" and cfg.max_companies == 2000
    cfg = config.load(write(tmp_path, 'http_listen = "127.0.0.1:8480"\nmax_companies = 50\n'), environ={})
    assert cfg.http_listen == "127.0.0.1:8480" and cfg.max_companies == 50
    cfg = config.load(write(tmp_path, ""), environ={"WAPORT_HTTP_LISTEN": "[::1]:0", "WAPORT_MAX_COMPANIES": "3"})
    assert cfg.http_listen == "[::1]:0" and cfg.max_companies == 3
    assert config.load(write(tmp_path, 'http_listen = " "\n'), environ={}).http_listen == ""


@pytest.mark.parametrize("value,seconds", [(5, 5.0), ("500ms", 0.5), ("5 s", 5.0), ("2m", 120.0), ("2min", 120.0),
                                           ("1.5h", 5400.0), ("1d", 86400.0)])
def test_durations(tmp_path, value, seconds):
    text = f"stop_timeout = {value!r}\n".replace("'", '"')
    assert config.load(write(tmp_path, text), environ={}).stop_timeout == seconds


@pytest.mark.parametrize("value,match", [("-1", "stop_timeout: must not be negative"),
                                         ('"5 weeks"', "stop_timeout: '5 weeks' is not a duration"),
                                         ("true", "stop_timeout: expected a duration, got True"),
                                         ("inf", "stop_timeout: must be a finite number"),
                                         ("[1]", "stop_timeout: expected a duration, got a list")])
def test_bad_durations_name_the_key(tmp_path, value, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, f"stop_timeout = {value}\n"), environ={})


def test_sim_options_nested_too_deeply_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sim_options"):
        config.load(write(tmp_path, ""), environ={"WAPORT_SIM_OPTIONS": "[" * 100_000})


def test_proxy_and_the_go_runtime_keys(tmp_path):
    from waportd.process import go_env

    cfg = config.load(write(tmp_path, 'proxy = "socks5://op:pw@10.0.0.5:1080"\ngo_gc = 50\n'
                                      'go_memory_limit = "48MiB"\ngo_max_procs = 2\n'), environ={})
    assert (cfg.proxy, cfg.go_gc, cfg.go_memory_limit, cfg.go_max_procs) == (
        "socks5://op:pw@10.0.0.5:1080", 50, 48 << 20, 2)
    assert "pw" not in repr(cfg)  # a proxy's password never reaches a log line through the config
    assert go_env(cfg.go_gc, cfg.go_memory_limit, cfg.go_max_procs) == {
        "GOGC": "50", "GOMEMLIMIT": f"{48 << 20}B", "GOMAXPROCS": "2"}
    assert go_env(0, 0, 0) == {}  # Go's own defaults
    for bad in ('"ftp://x:21"', '"http://host"', '"socks5://:1080"', '"http://a b:1"'):
        with pytest.raises(ConfigError, match="proxy"):
            config.load(write(tmp_path, f"proxy = {bad}\n"), environ={})
    with pytest.raises(ConfigError, match="go_gc"):
        config.load(write(tmp_path, "go_gc = -1\n"), environ={})


def test_a_backend_whose_dependencies_are_missing_is_named_with_what_to_install():
    from waportd.process import missing_for

    found = lambda _name: object()  # noqa: E731
    nothing = lambda _name: None  # noqa: E731
    assert missing_for("sim", nothing, nothing) is None
    assert missing_for("neonize", found, found) is None
    said = missing_for("neonize", nothing, found)
    assert "pip install neonize==0.5.2" in said and 'backend = "sim"' in said and "libmagic" not in said
    assert "apt-get install libmagic1" in missing_for("neonize", found, nothing)


def test_cluster_keys_are_checked_and_the_dsn_never_shown():
    cfg = config.load("/dev/null", environ={"WAPORT_CLUSTER_DSN": "postgresql://waport:s3cret@db/waport?sslmode=require",
                                            "WAPORT_HOST_ID": "host-a.example"})
    assert cfg.host_id == "host-a.example" and "s3cret" not in repr(cfg)
    assert config.load("/dev/null", environ={}).cluster_dsn == ""
    for env, match in (({"WAPORT_CLUSTER_DSN": "mysql://x"}, "cluster_dsn"),
                       ({"WAPORT_HOST_ID": "a b"}, "host_id"),
                       ({"WAPORT_FENCE_AFTER": "12"}, "less than lease_ttl"),
                       ({"WAPORT_FENCE_AFTER": "4", "WAPORT_LEASE_RENEW_INTERVAL": "2"}, "more than two"),
                       ({"WAPORT_LEASE_TTL": "0"}, "lease_ttl")):
        with pytest.raises(ConfigError, match=match):
            config.load("/dev/null", environ=env)


def test_a_dsn_without_sslmode_is_refused_for_neonize(tmp_path) -> None:
    dsn = "postgresql://waport@db/waport"
    with pytest.raises(ConfigError, match="sslmode"):
        config.load("/dev/null", environ={"WAPORT_CLUSTER_DSN": dsn})  # neonize: the default backend
    assert config.load("/dev/null", environ={"WAPORT_CLUSTER_DSN": dsn, "WAPORT_BACKEND": "sim"}).cluster_dsn == dsn
    assert config.load("/dev/null", environ={"WAPORT_CLUSTER_DSN": dsn + "?sslmode=require"}).cluster_dsn
