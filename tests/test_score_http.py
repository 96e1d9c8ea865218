"""score.py's HTTP routes, its refusals, concurrent saves and the scores.json format, without a browser."""

import glob
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
from score_round import read_json, serving, write_json, write_round

import score
from utils.cli import parse_settings
from utils.files import write_json_atomic
from utils.samples import parse_webui_parameters, read_png_parameters

SEEDS = [2, 10, 33]  # 10 after 2: seed order, not text order
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def round_folder(tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, SEEDS)
    # beside the round, and never to be served or listed
    write_round(folder / "history" / "round_001", [2, 7])
    (folder / "latents").mkdir()
    (folder / "latents" / "2.safetensors").write_bytes(b"latent")
    (folder / "round.json").write_text('{"seeds": [2, 10, 33]}')
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "secret.png").write_text("SECRET")  # outside the samples folder
    return folder


@pytest.fixture
def server(round_folder):
    with serving(round_folder, round_folder / "scores.json") as url:
        yield url


def request(base_url, method, path, body=None, headers=None):
    """(status, headers, body bytes); the path is sent exactly as given (no normalising of ".."), as an attacker
    would."""
    connection = http.client.HTTPConnection(urlsplit(base_url).netloc, timeout=10)
    connection.putrequest(method, path, skip_accept_encoding=True)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if data is not None:
        all_headers["Content-Length"] = str(len(data))
    for name, value in all_headers.items():
        if value is not None:
            connection.putheader(name, value)
    connection.endheaders(data)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def post_score(base_url, file, value):
    status, _, body = request(base_url, "POST", "/api/score", {"file": file, "score": value})
    return status, json.loads(body)


# ---------------------------------------------------------------- GET routes

@pytest.mark.parametrize("path, content_type, expected", [
    ("/", "text/html", b'<script src="score.js"'),
    ("/score.css", "text/css", b".badge"),
    ("/score.js", "text/javascript", b"api/score"),
])
def test_page_files_are_served(server, path, content_type, expected):
    status, headers, body = request(server, "GET", path)
    assert status == 200
    assert headers["Content-Type"].startswith(content_type)
    assert expected in body


def test_page_needs_nothing_from_the_internet():
    for path in glob.glob(os.path.join(score.PAGE_FOLDER, "*")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "http:" not in text and "https:" not in text and "@import" not in text, path
        assert not re.search(r"""(src|href)\s*=\s*["']//""", text), path


def test_state_lists_the_round_in_seed_order_with_parameters_and_scores(round_folder):
    write_json(round_folder / "scores.json", {"10.png": -2})
    with serving(round_folder, round_folder / "scores.json") as url:  # scores are read at start
        status, _, body = request(url, "GET", "/api/state")
    assert status == 200
    state = json.loads(body)
    assert [image["file"] for image in state["images"]] == ["2.png", "10.png", "33.png"]
    assert state["images"][1] == {"file": "10.png", "score": -2, "prompt": "a neon sign <lora:ui_lora_epoch_10:1>",
                                  "seed": "10", "lora": "ui_lora_epoch_10:1", "width": 96, "height": 144}
    assert state["images"][0]["score"] is None
    assert state["notice"] is None


def test_round_images_are_served_as_they_are(round_folder, server):
    status, headers, body = request(server, "GET", "/images/10.png")
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert body == (round_folder / "10.png").read_bytes()


@pytest.mark.parametrize("path", [
    "/images/../secret.png", "/images/..%2Fsecret.png", "/images/%2e%2e%2fsecret.png", "/images/%2E%2E/secret.png",
    "/images/%252e%252e%252fsecret.png", "/images/..\\secret.png", "/images/../samples/../secret.png",
    "/images//etc/passwd", "/images/%2Fetc%2Fpasswd",
    "/images/history/round_001/7.png", "/images/history%2Fround_001%2F7.png", "/images/latents/2.safetensors",
    "/images/notes.txt", "/images/round.json", "/images/scores.json", "/images/", "/images/11.png",
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/config.py", "/score.py", "/utils/score_page/index.html",
    "/index.html/../../config.py", "/2.png", "/samples/2.png", "/api/nothing",
])
def test_nothing_but_the_round_and_the_page_is_served(server, path):
    status, _, body = request(server, "GET", path)
    assert status == 404, body
    assert b"SECRET" not in body and b"import" not in body and b"root:" not in body


# ---------------------------------------------------------------- saving scores

def test_each_score_is_saved_at_once_in_the_seed_format(round_folder):
    write_json(round_folder / "scores.json", {"2.png": 1, "gone.png": -3})  # gone.png: an image no longer here
    with serving(round_folder, round_folder / "scores.json") as url:
        assert post_score(url, "10.png", 3) == (200, {"file": "10.png", "score": 3})
        assert read_json(round_folder / "scores.json") == {"2.png": 1, "gone.png": -3, "10.png": 3}
        assert post_score(url, "2.png", -5)[0] == 200
        assert post_score(url, "33.png", 0)[0] == 200
        assert read_json(round_folder / "scores.json") == {"2.png": -5, "gone.png": -3, "10.png": 3, "33.png": 0}
        assert post_score(url, "10.png", None) == (200, {"file": "10.png", "score": None})  # removes the score
        assert read_json(round_folder / "scores.json") == {"2.png": -5, "gone.png": -3, "33.png": 0}

        status, headers, body = request(url, "GET", "/scores.json")
        assert status == 200
        assert 'filename="scores.json"' in headers["Content-Disposition"]
        assert json.loads(body) == read_json(round_folder / "scores.json")
    assert not glob.glob(str(round_folder / ".*tmp")), "a temporary file was left behind"


def test_scores_from_the_seed_webapp_load_and_ours_load_in_train_reward(round_folder):
    (round_folder / "scores.json").write_text('{"33.png":4,"2.png":-1}')  # as the WebApp's JSON.stringify writes it
    with serving(round_folder, round_folder / "scores.json") as url:
        state = json.loads(request(url, "GET", "/api/state")[2])
        scores = {image["file"]: image["score"] for image in state["images"]}
        assert scores == {"2.png": -1, "10.png": None, "33.png": 4}
        post_score(url, "10.png", 5)
    saved = read_json(round_folder / "scores.json")
    assert saved == {"33.png": 4, "2.png": -1, "10.png": 5}
    assert all(type(value) is int for value in saved.values())
    from utils.ratings import read_scores
    assert read_scores(str(round_folder / "scores.json")) == saved


@pytest.mark.parametrize("body, message", [
    ({"file": "2.png", "score": 6}, "not a whole number from -5 to 5"),
    ({"file": "2.png", "score": -6}, "not a whole number from -5 to 5"),
    ({"file": "2.png", "score": 2.5}, "not a whole number from -5 to 5"),
    ({"file": "2.png", "score": "3"}, "not a whole number from -5 to 5"),
    ({"file": "2.png", "score": True}, "not a whole number from -5 to 5"),
    ({"file": "7.png", "score": 1}, "not an image of this round"),  # in history/, not in the round
    ({"file": "../2.png", "score": 1}, "not an image of this round"),
    ({"file": "notes.txt", "score": 1}, "not an image of this round"),
    ({"file": ["2.png"], "score": 1}, "not an image of this round"),
    ({"file": "2.png"}, 'send {"file"'),
    ({"file": "2.png", "score": 1, "extra": 1}, 'send {"file"'),
    ([["2.png", 1]], 'send {"file"'),
    (b"2.png=1", "not JSON"),
    (b"", "1 to 4096 bytes"),
    (b"{" + b" " * 5000 + b"}", "1 to 4096 bytes"),
])
def test_bad_scores_are_refused_and_nothing_is_written(round_folder, server, body, message):
    assert post_score(server, "10.png", 2)[0] == 200
    before = (round_folder / "scores.json").read_bytes()
    status, _, answer = request(server, "POST", "/api/score", body)
    assert status == 400
    assert message in json.loads(answer)["error"]
    assert (round_folder / "scores.json").read_bytes() == before


def test_posts_that_are_not_json_requests_are_refused(round_folder, server):
    body = json.dumps({"file": "2.png", "score": 1}).encode()
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": None}):
        status, _, answer = request(server, "POST", "/api/score", body, headers)
        assert status == 400 and "application/json" in json.loads(answer)["error"]
    status, _, _ = request(server, "POST", "/api/other", body)
    assert status == 404
    assert not (round_folder / "scores.json").exists()


def test_a_failed_write_is_reported_not_hidden(round_folder):
    with serving(round_folder, round_folder / "scores.json") as url:
        (round_folder / "scores.json").mkdir()  # in the way: the rename onto it fails
        status, answer = post_score(url, "2.png", 1)
    assert status == 500 and "cannot write" in answer["error"]


def test_concurrent_saves_keep_every_score_and_the_file_whole(tmp_path):
    folder = tmp_path / "samples"
    names = write_round(folder, range(24))
    expected = {name: (index % 11) - 5 for index, name in enumerate(names)}
    torn_reads = []
    done = threading.Event()

    def read_until_done():  # a reader must never see a half-written file
        while not done.is_set():
            try:
                read_json(folder / "scores.json")
            except FileNotFoundError:
                pass
            except ValueError as error:
                torn_reads.append(error)

    def rate(share, url):
        for name in share:
            for value in (5, -5, expected[name]):  # the last post for a name is the one that must stay
                assert post_score(url, name, value)[0] == 200

    with serving(folder, folder / "scores.json") as url:
        reader = threading.Thread(target=read_until_done)
        reader.start()
        raters = [threading.Thread(target=rate, args=(names[i::8], url)) for i in range(8)]
        for thread in raters:
            thread.start()
        for thread in raters:
            thread.join()
        done.set()
        reader.join()
        assert json.loads(request(url, "GET", "/scores.json")[2]) == expected
    assert read_json(folder / "scores.json") == expected
    assert torn_reads == []


@pytest.mark.parametrize("content", ['{"2.png": 3,', "[1, 2]", '{"2.png": 9}', '{"2.png": "good"}', "\xff\xfe"])
def test_an_invalid_scores_json_is_kept_aside_and_the_page_says_so(round_folder, content):
    (round_folder / "scores.json").write_bytes(content.encode("latin-1"))
    with serving(round_folder, round_folder / "scores.json") as url:
        state = json.loads(request(url, "GET", "/api/state")[2])
        kept = glob.glob(str(round_folder / "scores.json.invalid-*"))
        assert len(kept) == 1
        assert open(kept[0], "rb").read() == content.encode("latin-1")
        assert os.path.basename(kept[0]) in state["notice"]
        assert all(image["score"] is None for image in state["images"])
        assert post_score(url, "2.png", 1)[0] == 200
    assert read_json(round_folder / "scores.json") == {"2.png": 1}


@pytest.mark.parametrize("make_folder", [lambda path: None, lambda path: path.mkdir()], ids=["missing", "empty"])
def test_no_images_gives_an_empty_round(tmp_path, make_folder):
    make_folder(tmp_path / "samples")
    with serving(tmp_path / "samples", tmp_path / "samples" / "scores.json") as url:
        assert request(url, "GET", "/")[0] == 200
        state = json.loads(request(url, "GET", "/api/state")[2])
        assert state["images"] == [] and state["sample_path"] == str(tmp_path / "samples")
        assert post_score(url, "1.png", 1)[0] == 400


# ---------------------------------------------------------------- the script itself

def test_a_taken_port_gives_a_free_one(round_folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = parse_settings([f"--sample_path={round_folder}", f"--score_port={port}"], score.USED_SETTINGS)
        server = score.make_server(settings)
        assert server.server_address[1] not in (port, 0)
        server.server_close()


def test_only_loopback_hosts_go_without_a_warning():
    assert score.is_loopback("127.0.0.1") and score.is_loopback("localhost") and score.is_loopback("127.0.1.1")
    assert not score.is_loopback("0.0.0.0") and not score.is_loopback("192.168.1.5") and not score.is_loopback("mybox")


@pytest.mark.stages
def test_the_script_prints_its_address_serves_and_stops_cleanly_on_ctrl_c(round_folder):
    process = subprocess.Popen(
        [sys.executable, "-u", os.path.join(REPO, "score.py"), f"--sample_path={round_folder}",
         f"--score_path={round_folder / 'scores.json'}", "--score_port=0", "--score_open_browser=False"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert "3 images in" in lines[0], lines
        url = lines[1].split()[2]
        assert url.startswith("http://127.0.0.1:"), lines
        assert post_score(url.rstrip("/"), "33.png", 2)[0] == 200
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "stopped" in output and "Traceback" not in output
    assert read_json(round_folder / "scores.json") == {"33.png": 2}


@pytest.mark.stages
def test_a_bad_setting_is_one_line_not_a_traceback(round_folder):
    result = subprocess.run([sys.executable, os.path.join(REPO, "score.py"), "--score_port=99999"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: score_port must be from 0 to 65535 (got 99999)."


# ---------------------------------------------------------------- utils/files.py

def test_webui_parameters_are_read_back_from_the_png(round_folder):
    parsed = parse_webui_parameters(read_png_parameters(round_folder / "33.png"))
    assert parsed["prompt"] == "a neon sign <lora:ui_lora_epoch_10:1>"
    assert parsed["negative_prompt"] == "worst quality, low quality"
    assert parsed["loras"] == [("ui_lora_epoch_10", "1")]
    assert parsed["settings"]["Seed"] == "33" and parsed["settings"]["Size"] == "96x144"
    assert parsed["settings"]["CFG scale"] == "5.0" and parsed["settings"]["Sampler"] == "DDIM"


def test_webui_parameters_edge_cases():
    text = ('a cat,\nin the rain <lora:a:0.5> <lora:b:1>\nNegative prompt: blurry,\nugly\n'
            'Steps: 30, Sampler: "Euler a, karras", Seed: 7, Size: 512x768')
    parsed = parse_webui_parameters(text)
    assert parsed["prompt"] == "a cat,\nin the rain <lora:a:0.5> <lora:b:1>"
    assert parsed["negative_prompt"] == "blurry,\nugly"
    assert parsed["loras"] == [("a", "0.5"), ("b", "1")]
    assert parsed["settings"] == {"Steps": "30", "Sampler": "Euler a, karras", "Seed": "7", "Size": "512x768"}
    assert parse_webui_parameters("just a prompt: nothing else") == {
        "prompt": "just a prompt: nothing else", "negative_prompt": "", "loras": [], "settings": {}}
    assert parse_webui_parameters("")["prompt"] == ""


def test_write_json_atomic_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "scores.json"
    write_json_atomic(path, {"1.png": 1})
    write_json_atomic(path, {"2.png": -2})
    assert read_json(path) == {"2.png": -2}
    assert os.listdir(tmp_path) == ["scores.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"3.png": object()})  # fails halfway through writing
    assert read_json(path) == {"2.png": -2}
    assert os.listdir(tmp_path) == ["scores.json"]


# ---------------------------------------------------------------- comparisons and the next pair

def post_comparison(base_url, body):
    status, _, answer = request(base_url, "POST", "/api/compare", body)
    return status, json.loads(answer)


def test_comparisons_are_appended_at_once_and_answered_with_a_new_pair(round_folder, server):
    status, _, body = request(server, "GET", "/api/next_pair")
    first = json.loads(body)
    assert status == 200 and first["comparisons"] == 0
    assert first["a"] != first["b"] and {first["a"], first["b"]} <= {"2.png", "10.png", "33.png"}
    status, answer = post_comparison(server, {"a": first["a"], "b": first["b"], "winner": "b"})
    assert status == 200 and answer["saved"] == {"a": first["a"], "b": first["b"], "winner": "b"}
    assert read_json(round_folder / "comparisons.json") == [answer["saved"]]
    second = answer["next"]
    assert second["comparisons"] == 1 and {second["a"], second["b"]} != {first["a"], first["b"]}
    assert post_comparison(server, {"a": second["a"], "b": second["b"], "winner": "tie"})[0] == 200
    third = json.loads(request(server, "GET", "/api/next_pair")[2])
    assert post_comparison(server, {"a": third["a"], "b": third["b"], "winner": "a"})[1]["next"] == {
        "a": None, "b": None, "comparisons": 3}  # three images make three pairs, each asked once
    saved = read_json(round_folder / "comparisons.json")
    assert [c["winner"] for c in saved] == ["b", "tie", "a"]
    pairs = [("2.png", "10.png"), ("2.png", "33.png"), ("10.png", "33.png")]
    assert {frozenset((c["a"], c["b"])) for c in saved} == {frozenset(p) for p in pairs}
    assert not (round_folder / "scores.json").exists() and not glob.glob(str(round_folder / ".*tmp"))
    from utils.ratings import read_comparisons
    assert read_comparisons(str(round_folder / "comparisons.json")) == saved


@pytest.mark.parametrize("body, message", [
    ({"a": "2.png", "b": "10.png", "winner": "left"}, 'winner \'left\' is not "a", "b" or "tie"'),
    ({"a": "2.png", "b": "10.png", "winner": None}, 'is not "a", "b" or "tie"'),
    ({"a": "2.png", "b": "2.png", "winner": "a"}, "cannot be compared with itself"),
    ({"a": "7.png", "b": "10.png", "winner": "a"}, "'7.png' is not an image of this round"),  # history/ only
    ({"a": "2.png", "b": "../secret.png", "winner": "a"}, "not an image of this round"),
    ({"a": "2.png", "b": 10, "winner": "a"}, "10 is not an image of this round"),
    ({"a": "2.png", "b": "10.png"}, 'send {"a"'),
    ({"a": "2.png", "b": "10.png", "winner": "a", "score": 1}, 'send {"a"'),
    ({"file": "2.png", "score": 1}, 'send {"a"'),
    (b"a=2.png", "not JSON"),
    (b"", "1 to 4096 bytes"),
])
def test_bad_comparisons_are_refused_and_nothing_is_written(round_folder, server, body, message):
    assert post_comparison(server, {"a": "2.png", "b": "10.png", "winner": "a"})[0] == 200
    before = (round_folder / "comparisons.json").read_bytes()
    status, answer = post_comparison(server, body)
    assert status == 400
    assert message in answer["error"]
    assert (round_folder / "comparisons.json").read_bytes() == before


def test_an_invalid_comparisons_json_is_kept_aside_and_the_page_says_so(round_folder):
    (round_folder / "comparisons.json").write_text('[{"a": "2.png", "b": "2.png", "winner": "a"}]')
    with serving(round_folder, round_folder / "scores.json") as url:
        state = json.loads(request(url, "GET", "/api/state")[2])
        kept = glob.glob(str(round_folder / "comparisons.json.invalid-*"))
        assert len(kept) == 1 and os.path.basename(kept[0]) in state["notice"]
        assert state["comparisons"] == 0
        assert post_comparison(url, {"a": "33.png", "b": "2.png", "winner": "tie"})[0] == 200
    assert read_json(round_folder / "comparisons.json") == [{"a": "33.png", "b": "2.png", "winner": "tie"}]


def test_state_offers_the_informative_order_only_with_an_ensemble(round_folder):
    entries = [{"file": f, "mean": 0.0, "std": s, "members": [-s, s]} for f, s in [("33.png", 0.4), ("2.png", 0.1)]]
    write_json(round_folder / "rating_order.json", {"reward_model": "m", "ensemble_size": 2, "images": entries})
    with serving(round_folder, round_folder / "scores.json") as url:
        state = json.loads(request(url, "GET", "/api/state")[2])
    assert state["order"] == ["33.png", "2.png"] and state["order_note"] is None
    write_json(round_folder / "rating_order.json", {"reward_model": "m", "ensemble_size": 1,
                                                    "images": [dict(e, std=0.0) for e in entries]})
    with serving(round_folder, round_folder / "scores.json") as url:
        state = json.loads(request(url, "GET", "/api/state")[2])
    assert state["order"] is None and "--train_reward_ensemble_size" in state["order_note"]
