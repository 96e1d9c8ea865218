"""utils/ratings.py is the one place for the ratings: its reader and its check of a POST body, tested from
outside. Hostile bodies get the same 400 from /api/score and /api/compare with nothing written; a FIFO,
a folder or a deeply nested file where the page reads JSON is a sentence, never a hang or a traceback;
every answer of the page, the server's own errors too, carries the security headers; a reward model
of the other model family does not order a round; comparison pairs never cross prompt groups."""

import http.client
import json
import os
import random
import threading

import pytest
import torch
from score_round import serving, write_json, write_round

import score
import train_reward
from ddpo.rating_order import next_pairs
from ddpo.reward_model import LatentRewardModel, RewardEnsemble
from utils.cli import parse_settings
from utils.errors import UserError
from utils.ratings import (
    RatingsFileError,
    read_comparisons,
    read_rating_order,
    read_request,
    read_round_ratings,
    read_scores,
    update_rating_order,
)
from utils.reward_files import save_reward_model
from utils.samples import latent_file, round_prompts, save_latent

SEEDS = [2, 10, 33]
ROUTES = {"/api/score": {"file": "10.png", "score": 4}, "/api/compare": {"a": "2.png", "b": "10.png", "winner": "a"}}
WRITTEN = {"/api/score": "scores.json", "/api/compare": "comparisons.json"}
NESTED = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit


@pytest.fixture
def round_folder(tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, SEEDS)
    return folder


@pytest.fixture
def server(round_folder):
    with serving(round_folder, round_folder / "scores.json") as url:
        yield url


def post(url, path, body, content_type="application/json", length=None):
    """(status, headers, body) of a real POST with exactly this body and these headers."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    headers = {"Content-Length": str(len(body)) if length is None else length}
    if content_type is not None:
        headers["Content-Type"] = content_type
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    answer = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    connection.close()
    return answer


def finishes(function, seconds=10):
    """function()'s result, or a failure if it has not returned within `seconds` (a read that hangs)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} still running after {seconds} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---------------------------------------------------------------- hostile bodies: one check, both routes

HOSTILE_BODIES = {  # the same bytes to both routes
    "deeply nested": ("[" * 3000 + "]" * 1000).encode(),
    "not UTF-8": b"\xff\xfe\x00",
    "UTF-16": json.dumps({"file": "10.png", "score": 4}).encode("utf-16"),
    "NUL bytes": b"\x00" * 100,
    "a list": b'["10.png", 4]',
    "a string": b'"10.png"',
    "a number": b"12",
    "null": b"null",
    "not JSON": b"file=10.png&score=4",
}
HOSTILE_VALUES = {  # one field of a body right otherwise: (score's body, compare's body, the value)
    "a nested field": ('{"file": %s, "score": 1}', '{"a": "2.png", "b": %s, "winner": "a"}', "[" * 2000 + "]" * 2000),
    "infinity": ('{"file": "10.png", "score": %s}', '{"a": "2.png", "b": "10.png", "winner": %s}', "1e999"),
    "NaN": ('{"file": "10.png", "score": %s}', '{"a": "2.png", "b": "10.png", "winner": %s}', "NaN"),
    "a huge number": ('{"file": "10.png", "score": %s}', '{"a": "2.png", "b": %s, "winner": "a"}', "9" * 3000),
    "a list for a name": ('{"file": %s, "score": 1}', '{"a": %s, "b": "10.png", "winner": "a"}', '["10.png"]'),
    "a path out of the round": ('{"file": %s, "score": 1}', '{"a": "2.png", "b": %s, "winner": "a"}', '"../10.png"'),
    "a string for a number": ('{"file": "10.png", "score": %s}', '{"a": "2.png", "b": "10.png", "winner": %s}', '"1"'),
}


def hostile_body(route, case):
    if case in HOSTILE_BODIES:
        return HOSTILE_BODIES[case]
    score_body, compare_body, value = HOSTILE_VALUES[case]
    return ((score_body if route == "/api/score" else compare_body) % value).encode()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", [*HOSTILE_BODIES, *HOSTILE_VALUES])
def test_a_hostile_body_is_the_same_400_on_both_routes_and_nothing_is_written(round_folder, server, route, case):
    status, headers, answer = post(server, route, hostile_body(route, case))
    assert status == 400 and headers["x-frame-options"] == "DENY"
    error = json.loads(answer)["error"]
    assert error and "\n" not in error and "Traceback" not in error
    if case in HOSTILE_VALUES and case != "a nested field":  # refused for its value, not its shape
        assert not error.startswith("send {"), error
    assert not (round_folder / WRITTEN[route]).exists()
    assert post(server, route, json.dumps(ROUTES[route]).encode())[0] == 200  # and the page goes on


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("missing", [0, 1, -1])
def test_a_body_missing_a_field_or_with_an_extra_one_is_refused_on_both_routes(round_folder, server, route, missing):
    fields = list(ROUTES[route].items())
    body = dict(fields[:missing] + fields[missing + 1:]) if missing != -1 else {**ROUTES[route], "extra": 1}
    status, _, answer = post(server, route, json.dumps(body).encode())
    assert status == 400 and json.loads(answer)["error"].startswith("send {")
    assert not (round_folder / WRITTEN[route]).exists()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content_type, length, words", [
    ("text/plain", None, "application/json"), (None, None, "application/json"),
    ("application/x-www-form-urlencoded", None, "application/json"),
    ("application/json", "4097", "1 to 4096 bytes"), ("application/json", "99999999999", "1 to 4096 bytes"),
    ("application/json", "-1", "1 to 4096 bytes"), ("application/json", "0", "1 to 4096 bytes"),
])
def test_a_wrong_content_type_or_size_is_refused_on_both_routes(round_folder, server, route, content_type, length,
                                                                 words):
    body = json.dumps(ROUTES[route]).encode() if length is None else b""
    status, _, answer = post(server, route, body, content_type, length)
    assert status == 400 and words in json.loads(answer)["error"]
    assert not (round_folder / WRITTEN[route]).exists()


def test_a_huge_body_is_refused_without_reading_it(round_folder, server):
    for route in ROUTES:
        status, _, answer = post(server, route, b"[" * 5000)
        assert status == 400 and "4096 bytes" in json.loads(answer)["error"]


def test_read_request_checks_each_route_with_one_function():
    names = ["2.png", "10.png"]
    assert read_request("/api/score", b'{"file": "2.png", "score": null}', names) == {"file": "2.png", "score": None}
    assert read_request("/api/compare", b'{"a": "2.png", "b": "10.png", "winner": "tie"}', names) == {
        "a": "2.png", "b": "10.png", "winner": "tie"}
    for route, body, words in [("/api/score", b'{"file": "2.png", "score": true}', "whole number"),
                               ("/api/score", b'{"file": "2.png", "score": 2.0}', "whole number"),
                               ("/api/compare", b'{"a": "2.png", "b": "2.png", "winner": "a"}', "itself"),
                               ("/api/compare", b'{"a": "2.png", "b": "10.png", "winner": "A"}', "winner 'A'"),
                               ("/api/compare", b'{"file": "2.png", "score": 1}', 'send {"a"'),
                               ("/api/score", NESTED.encode(), "nested too deeply")]:
        with pytest.raises(ValueError, match=words):
            read_request(route, body, names)


# ---------------------------------------------------------------- files that are not what they should be

def make_fifo(path):
    if os.path.lexists(path):
        os.remove(path)
    os.mkfifo(path)


@pytest.mark.parametrize("name", ["scores.json", "comparisons.json"])
@pytest.mark.parametrize("make", [make_fifo, os.mkdir], ids=["fifo", "folder"])
def test_a_ratings_file_that_is_not_a_regular_file_is_a_sentence_not_a_hang(round_folder, name, make):
    path = round_folder / name
    make(path)
    reader = read_scores if name == "scores.json" else read_comparisons
    with pytest.raises(UserError) as refusal:
        finishes(lambda: reader(str(path)))
    message = str(refusal.value)
    assert str(path) in message and "not a regular file" in message and "\n" not in message
    settings = parse_settings([f"--sample_path={round_folder}", "--score_port=0", "--score_open_browser=False"],
                              score.USED_SETTINGS)
    with pytest.raises(UserError, match="not a regular file"):  # the page does not start, and moves nothing
        finishes(lambda: score.make_server(settings))
    assert os.path.lexists(path) and not list(round_folder.glob("*.invalid-*"))
    assert not (round_folder / ".lock").exists()
    train_settings = parse_settings([f"--sample_path={round_folder}", "--device=cpu"], train_reward.USED_SETTINGS)
    with pytest.raises(UserError, match="not a regular file"):
        finishes(lambda: train_reward.load_ratings(train_settings, "cpu"))


@pytest.mark.parametrize("make", [make_fifo, lambda path: path.write_text(NESTED), os.mkdir,
                                  lambda path: path.write_bytes(b"\xff\xfe{")], ids=["fifo", "nested", "folder", "bad"])
def test_a_hostile_rating_order_or_round_json_leaves_the_page_working(round_folder, make):
    make(round_folder / "rating_order.json")
    make(round_folder / "round.json")
    assert finishes(lambda: read_rating_order(str(round_folder))) is None
    assert finishes(lambda: round_prompts(str(round_folder))) == {}
    with serving(round_folder, round_folder / "scores.json") as url:
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        for path in ("/api/state", "/api/next_pair"):
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200, path
            answer = json.loads(response.read())
        connection.close()
        assert answer["a"] in {"2.png", "10.png", "33.png"}
        assert post(url, "/api/score", json.dumps(ROUTES["/api/score"]).encode())[0] == 200


def test_a_fifo_in_place_of_an_image_is_neither_listed_nor_served(round_folder, server):
    os.mkfifo(round_folder / "5.png")
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=10)
    connection.request("GET", "/images/5.png")
    assert connection.getresponse().status == 404
    connection.close()


def test_the_one_reader_gives_a_rounds_usable_ratings(tmp_path):
    scores, comparisons = tmp_path / "scores.json", tmp_path / "comparisons.json"
    assert read_round_ratings(str(scores), str(comparisons)) == ({}, [])
    write_json(scores, {"2.png": 1, "../x.png": 5, "/etc/x.png": 2, "10.png": -5})
    write_json(comparisons, [{"a": "2.png", "b": "10.png", "winner": "tie"}])
    assert read_scores(str(scores)) == {"2.png": 1, "../x.png": 5, "/etc/x.png": 2, "10.png": -5}  # as saved
    assert read_round_ratings(str(scores), str(comparisons)) == ({"2.png": 1, "10.png": -5},
                                                                 [{"a": "2.png", "b": "10.png", "winner": "tie"}])
    write_json(comparisons, [{"a": "2.png", "b": "../10.png", "winner": "a"}])
    with pytest.raises(RatingsFileError) as refusal:
        read_round_ratings(str(scores), str(comparisons))
    assert refusal.value.path == str(comparisons) and "entry 1" in refusal.value.problem
    scores.write_text(NESTED)
    with pytest.raises(RatingsFileError, match="nested too deeply"):
        read_scores(str(scores))


# ---------------------------------------------------------------- security headers on every answer

def raw_exchange(url, request_bytes):
    """The status line and headers of the answer to `request_bytes`, sent as they are."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    connection.connect()
    connection.sock.sendall(request_bytes)
    response = http.client.HTTPResponse(connection.sock, method="GET")
    response.begin()
    answer = response.status, {k.lower(): v for k, v in response.getheaders()}
    connection.close()
    return answer


def test_every_answer_of_the_page_carries_its_security_headers_errors_too(round_folder, server):
    host = server.removeprefix("http://")
    requests = {
        "unknown method (501)": f"PUT /api/score HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "malformed request line (400)": f"GET / extra HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "URL too long (414)": f"GET /{'x' * 70000} HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "too many headers (431)": f"GET / HTTP/1.1\r\nHost: {host}\r\n" + "X-A: 1\r\n" * 120 + "\r\n",
        "another host (403)": "GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        "not found (404)": f"GET /nothing HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "bad body (400)": f"POST /api/compare HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          "Content-Length: 3\r\n\r\n[[[",
    }
    statuses = set()
    for what, request in requests.items():
        status, headers = raw_exchange(server, request.encode())
        statuses.add(status)
        for name, value in score.SECURITY_HEADERS.items():
            assert headers.get(name.lower()) == value, (what, name)
    assert statuses == {501, 400, 414, 431, 403, 404}
    (round_folder / "scores.json").mkdir()  # in the way: the write fails, a 500
    status, headers, answer = post(server, "/api/score", json.dumps(ROUTES["/api/score"]).encode())
    assert status == 500 and headers["x-frame-options"] == "DENY"
    assert json.loads(answer)["error"].startswith(f"cannot write {round_folder / 'scores.json'} (")


# ---------------------------------------------------------------- a reward model of the other family

@pytest.mark.parametrize("model_family, latent_family", [("sd15", "sdxl"), ("sdxl", "sd15")])
def test_a_reward_model_of_the_other_family_does_not_order_the_round(round_folder, model_family, latent_family):
    torch.manual_seed(0)
    for seed in SEEDS:
        save_latent(latent_file(str(round_folder), f"{seed}.png"), torch.randn(4, 8, 8), latent_family)
    model_path = str(round_folder.parent / "reward_model.safetensors")
    save_reward_model(RewardEnsemble([LatentRewardModel() for _ in range(2)]), model_path, {"family": model_family})
    line = update_rating_order(str(round_folder), model_path)
    assert line.startswith(f"not ordering {round_folder}") and "\n" not in line
    assert {"SD1.x", "SDXL"} <= set(line.replace(",", " ").split()) and model_path in line
    assert not (round_folder / "rating_order.json").exists()
    save_reward_model(RewardEnsemble([LatentRewardModel() for _ in range(2)]), model_path, {"family": latent_family})
    assert update_rating_order(str(round_folder), model_path).startswith("wrote ")
    assert [entry["file"] for entry in read_rating_order(str(round_folder))] != []


# ---------------------------------------------------------------- comparison pairs within a prompt group

PREDICTIONS = [{"file": f"{i}.png", "mean": (i * 7 % 11) / 10, "std": 0.1,
                "members": [(i * k % 5) / 4 for k in (1, 2, 3)]} for i in range(12)]


def test_pairs_never_cross_groups_and_one_group_is_no_groups():
    names = [f"{i}.png" for i in range(14)]  # 12 and 13 have no prediction
    comparisons = [{"a": "1.png", "b": "4.png", "winner": "a"}]
    for seed in range(20):
        groups = {name: random.Random(seed).choice("xyz") + str(i % 2) for i, name in enumerate(names)}
        pairs = next_pairs(names, PREDICTIONS, comparisons, {"3.png"}, random.Random(seed), count=200, groups=groups)
        assert pairs and all(groups[a] == groups[b] for a, b in pairs)
        same_group = {frozenset((a, b)) for a in names for b in names if a != b and groups[a] == groups[b]}
        assert {frozenset(pair) for pair in pairs} <= same_group
        one_group = next_pairs(names, PREDICTIONS, comparisons, {"3.png"}, random.Random(seed), count=30,
                               groups=dict.fromkeys(names, "a prompt"))
        assert one_group == next_pairs(names, PREDICTIONS, comparisons, {"3.png"}, random.Random(seed), count=30)


def test_one_group_picks_the_pairs_it_picked_before_groups_existed():
    names = [f"{i}.png" for i in range(14)]
    # next_pairs before groups (commit 00fe397), these arguments: the same pairs, in the same order
    assert next_pairs(names, PREDICTIONS, [{"a": "1.png", "b": "4.png", "winner": "a"}], {"3.png"},
                      random.Random(3), count=6, groups=dict.fromkeys(names, "p")) == [
        ("7.png", "9.png"), ("8.png", "2.png"), ("9.png", "6.png"), ("11.png", "4.png"), ("1.png", "3.png"),
        ("2.png", "6.png")]
