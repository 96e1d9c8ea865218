"""The rating page answers only the person at this machine, with real HTTP requests: no other Host
(DNS rebinding), no write from another origin, no framing, no file outside the round (symlinks), no
500 for a hostile body or a broken PNG, and one page per samples folder (the lock)."""

import http.client
import io
import json
import os
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from score_round import read_json, serving, write_round

import score
from utils.cli import parse_settings
from utils.errors import UserError

SEEDS = [2, 10, 33]


@pytest.fixture
def round_folder(tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, SEEDS)
    (tmp_path / "secret.txt").write_text("SECRET")
    return folder


@pytest.fixture
def server(round_folder):
    with serving(round_folder, round_folder / "scores.json") as url:
        yield url


def send(url, method, path, body=None, headers=None, host=None):
    """(status, headers, body) with exactly the given headers; Host is the server's address unless given."""
    netloc = url.removeprefix("http://")
    connection = http.client.HTTPConnection(netloc, timeout=10)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Host": netloc if host is None else host, **(headers or {})}
    if data is not None:
        all_headers.setdefault("Content-Type", "application/json")
        all_headers["Content-Length"] = str(len(data))
    for name, value in all_headers.items():
        connection.putheader(name, value)
    connection.endheaders(data)
    response = connection.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    connection.close()
    return result


def port_of(url):
    return url.rsplit(":", 1)[1]


SCORE = {"file": "10.png", "score": 4}


# ---------------------------------------------------------------- Host: DNS rebinding

@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1.nip.io:{port}", "localhost.:{port}",
                                  "127.0.0.1:1{port}", "127.0.0.1", "", "127.0.0.1:{port}@evil.example",
                                  "LOCALHOST:{port} x", "[::1]x:{port}"])
def test_a_request_naming_another_host_is_refused(round_folder, server, host):
    host = host.format(port=port_of(server))
    for method, path, body in (("GET", "/", None), ("GET", "/api/state", None), ("GET", "/images/2.png", None),
                               ("GET", "/scores.json", None), ("POST", "/api/score", SCORE)):
        status, _, answer = send(server, method, path, body, host=host)
        assert status == 403, (method, path, host)
        assert b"own address" in answer and b"neon" not in answer and b"PNG" not in answer
    assert not (round_folder / "scores.json").exists()


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "[::1]:{port}"])
def test_the_page_answers_to_its_loopback_names(server, host):
    host = host.format(port=port_of(server))
    assert send(server, "GET", "/api/state", host=host)[0] == 200
    assert send(server, "POST", "/api/score", SCORE, host=host, headers={"Origin": f"http://{host.lower()}"})[0] == 200


def test_listening_on_every_address_answers_to_ip_addresses_and_this_machines_name_only():
    hosts = score.allowed_hosts("0.0.0.0")
    headers = lambda host: {"Host": f"{host}:7870"}  # noqa: E731
    for host in ("127.0.0.1", "192.168.1.5", "[fe80::1]", "localhost", *hosts):
        assert score.check_request("GET", headers(host), 7870, hosts, any_ip=True) is None, host
    assert score.check_request("GET", headers("evil.example"), 7870, hosts, any_ip=True) is not None
    # a configured name is the only extra name
    assert score.check_request("GET", headers("mybox.lan"), 7870, score.allowed_hosts("mybox.lan"), False) is None
    assert score.check_request("GET", headers("192.168.1.5"), 7870, score.allowed_hosts("mybox.lan"), False) is not None


# ---------------------------------------------------------------- writes only from the page itself

@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://localhost:{port}"},
    {"Origin": "http://127.0.0.1:1{port}"}, {"Origin": "https://127.0.0.1:{port}"}, {"Origin": ""},
    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
])
def test_a_write_from_another_origin_is_refused_and_nothing_is_written(round_folder, server, headers):
    headers = {k: v.format(port=port_of(server)) for k, v in headers.items()}
    status, _, answer = send(server, "POST", "/api/score", SCORE, headers=headers)
    assert status == 403 and b"this page itself" in answer
    assert not (round_folder / "scores.json").exists()


@pytest.mark.parametrize("headers", [{}, {"Origin": "http://127.0.0.1:{port}"}, {"Sec-Fetch-Site": "same-origin"},
                                     {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}])
def test_a_write_from_the_page_or_a_local_tool_is_saved(round_folder, server, headers):
    headers = {k: v.format(port=port_of(server)) for k, v in headers.items()}
    assert send(server, "POST", "/api/score", SCORE, headers=headers)[0] == 200
    assert read_json(round_folder / "scores.json") == {"10.png": 4}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_guarded_too(server, method):
    assert send(server, method, "/api/score", SCORE, headers={"Origin": "http://evil.example"})[0] == 403
    assert send(server, method, "/api/score", SCORE)[0] == 501  # not a route at all


# ---------------------------------------------------------------- headers on every answer

@pytest.mark.parametrize("path", ["/", "/score.js", "/api/state", "/images/2.png", "/scores.json", "/nothing"])
def test_every_answer_forbids_framing_and_sniffing(server, path):
    _, headers, _ = send(server, "GET", path)
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cross-origin-resource-policy"] == "same-origin"


# ---------------------------------------------------------------- only real files of the round

def test_a_symlink_out_of_the_round_is_neither_listed_nor_served(round_folder, server):
    os.symlink(round_folder.parent / "secret.txt", round_folder / "50.png")
    os.symlink("/etc/passwd", round_folder / "51.png")
    (round_folder / "history").mkdir()
    write_round(round_folder / "history", [7])
    os.symlink(round_folder / "history" / "7.png", round_folder / "52.png")  # into a subfolder: not the round
    os.symlink(round_folder / "10.png", round_folder / "53.png")  # to a file of the round: fine
    os.mkdir(round_folder / "54.png")  # not a regular file
    for name in ("50.png", "51.png", "52.png", "54.png"):
        status, _, body = send(server, "GET", f"/images/{name}")
        assert status == 404 and b"SECRET" not in body and b"root:" not in body, name
        assert send(server, "POST", "/api/score", {"file": name, "score": 1})[0] == 400, name
    state = json.loads(send(server, "GET", "/api/state")[2])
    assert [image["file"] for image in state["images"]] == ["2.png", "10.png", "33.png", "53.png"]
    assert send(server, "GET", "/images/53.png")[2] == (round_folder / "10.png").read_bytes()


def test_scores_json_entries_naming_files_outside_the_round_are_ignored(round_folder, capsys):
    (round_folder / "scores.json").write_text(json.dumps({"2.png": 1, "../secret.png": 5, "/etc/x.png": 2}))
    with serving(round_folder, round_folder / "scores.json") as url:
        state = json.loads(send(url, "GET", "/api/state")[2])
        assert {image["file"]: image["score"] for image in state["images"]} == {"2.png": 1, "10.png": None,
                                                                                 "33.png": None}
        assert send(url, "POST", "/api/score", {"file": "../secret.png", "score": 1})[0] == 400
    assert "2 entries that name no file of its round" in capsys.readouterr().out
    assert read_json(round_folder / "scores.json")["../secret.png"] == 5  # kept as it was, never used


# ---------------------------------------------------------------- hostile bodies: 400 with a sentence

@pytest.mark.parametrize("body", [b"[" * 3000 + b"]" * 1000, b'{"file": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                                  b"\xff\xfe\x00", b'{"file": "2.png", "score": 1e999}', b"\x00" * 100])
def test_a_hostile_body_is_a_400_with_a_sentence(round_folder, server, body):
    status, _, answer = send(server, "POST", "/api/score", body)
    assert status == 400
    assert json.loads(answer)["error"]
    assert not (round_folder / "scores.json").exists()


@pytest.mark.parametrize("length", ["99999999999", "-1", "4097", "abc", "1, 2"])
def test_a_huge_or_lying_content_length_is_refused_without_reading(server, length):
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=10)
    connection.putrequest("POST", "/api/score")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", length)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 400 and b"bytes" in response.read()
    connection.close()


def png_chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_with_parameters(text):
    """A valid PNG whose only `parameters` text is `text` (as another program might write it)."""
    info = PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


@pytest.mark.parametrize("make", [
    lambda good: b"\x89PNG\r\n\x1a\n" + os.urandom(300),  # garbage after the signature
    lambda good: good[: len(good) // 3],  # truncated
    lambda good: os.urandom(2000),  # not a PNG at all
    lambda good: b"",
    lambda good: png_with_parameters('a\nSteps: 2, Sampler: "bad\\x", Seed: 3, Size: 9x9'),  # a bad "quoted" value
    lambda good: png_with_parameters("a\nSteps: 2, Sampler: DDIM, Seed: 3, Size: \u00b2x\u00b3"),  # digits, not 0-9
    lambda good: png_with_parameters("\n\n\n"),
    lambda good: good[:33] + png_chunk(b"zTXt", b"parameters\x00\x00not zlib") + good[33:],
    lambda good: good[:33] + png_chunk(b"iTXt", b"parameters\x00\x00\x00\x00\x00\xff\xfe\xfd") + good[33:],
], ids=["garbage", "truncated", "not a png", "empty", "bad quoted value", "superscript size", "blank lines",
        "bad ztxt", "bad itxt"])
def test_a_broken_png_does_not_break_the_page_for_the_others(round_folder, make):
    good = (round_folder / "10.png").read_bytes()
    (round_folder / "10.png").write_bytes(make(good))
    with serving(round_folder, round_folder / "scores.json") as url:
        status, _, body = send(url, "GET", "/api/state")
        assert status == 200, body
        images = {image["file"]: image for image in json.loads(body)["images"]}
        assert list(images) == ["2.png", "10.png", "33.png"]
        assert images["33.png"]["prompt"] == "a neon sign <lora:ui_lora_epoch_10:1>"
        assert images["10.png"]["seed"] in ("10", "3")
        assert send(url, "POST", "/api/score", SCORE)[0] == 200


# ---------------------------------------------------------------- one page per folder

def test_a_second_page_on_the_same_folder_is_refused_with_a_sentence(round_folder, server):
    settings = parse_settings([f"--sample_path={round_folder}", f"--score_path={round_folder / 'scores.json'}",
                               "--score_port=0", "--score_open_browser=False"], score.USED_SETTINGS)
    with pytest.raises(UserError) as refusal:
        score.make_server(settings)
    message = str(refusal.value)
    assert str(round_folder) in message and "score (pid" in message and str(os.getpid()) in message
    assert send(server, "GET", "/api/state")[0] == 200  # the first page is untouched


def test_the_lock_goes_with_the_page(round_folder):
    with serving(round_folder, round_folder / "scores.json"):
        assert (round_folder / ".lock").is_file()
    assert not (round_folder / ".lock").exists()
    with serving(round_folder, round_folder / "scores.json") as url:  # and a new page may start
        assert send(url, "GET", "/")[0] == 200
