from waportd import desired
from waportd.desired import Desired


def test_wanted_is_config_plus_started_minus_stopped():
    d = Desired()
    d.start("z")
    d.stop("b")
    assert d.wanted(["a", "b"]) == ["a", "z"]
    d.start("b")
    assert d.wanted(["a", "b"]) == ["a", "b", "z"]


def test_forget_keeps_a_configured_company_stopped():
    d = Desired(started={"x", "y"})
    d.forget("x", ["x"])
    d.forget("y", ["x"])
    assert d.wanted(["x"]) == [] and d.stopped == {"x"}


def test_persisted_round_trip(tmp_path):
    path = str(tmp_path / "desired.json")
    d = Desired(started={"a"}, stopped={"b"})
    desired.save(path, d)
    assert (tmp_path / "desired.json").stat().st_mode & 0o777 == 0o600
    assert desired.load(path) == d


def test_a_corrupt_file_is_set_aside(tmp_path):
    path = tmp_path / "desired.json"
    path.write_text("{not json")
    try:
        desired.load(str(path))
        raise AssertionError("expected CorruptState")
    except desired.CorruptState:
        pass
    assert (tmp_path / "desired.json.corrupt").exists() and desired.load(str(path)) == Desired()


def test_a_company_proxy_is_kept_and_goes_with_delete(tmp_path):
    path = str(tmp_path / "desired.json")
    d = Desired()
    d.start("acme")
    d.proxies["acme"] = "socks5://10.0.0.5:1080"
    desired.save(path, d)
    back = desired.load(path)
    assert back.proxies == {"acme": "socks5://10.0.0.5:1080"} and back.started == {"acme"}
    back.forget("acme", ())
    assert back.proxies == {}
    assert desired.Desired.from_json('{"started": ["x"]}').proxies == {}  # a file from before keeps working
