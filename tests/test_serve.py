"""`vlp serve` (docs/apps.md): every endpoint answers what the oracle model knows; every bad
input gets a one-line 4xx and the server keeps serving; no path outside the index is reachable;
requests past the in-flight and waiting limits get 503; model work runs off the event loop and
concurrent text searches share one encoder call."""

import asyncio
import inspect
import io
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from test_apps import ScaledOracle
from test_eval_any_data import COLOURS, CaptionOracle, image, image_folder
from typer.testing import CliRunner

from vlp.apps.index import Index, build
from vlp.apps.serve import Limits, create_app, serve
from vlp.cli import app as cli


class ServeOracle(CaptionOracle, ScaledOracle):
    """Searches and classifies by colour (ScaledOracle), captions "a red square", answers a
    question with the image's colour."""

    def answer_texts(self, images, questions):
        return [list(COLOURS)[c] for c in self.encode_image(images).argmax(dim=1).tolist()]


class BlockingOracle(ServeOracle):
    """Holds every text encoder call until `release` is set."""

    def __init__(self):
        super().__init__()
        self.release, self.entered = threading.Event(), threading.Event()

    def encode_text(self, input_ids, attention_mask):
        self.entered.set()
        assert self.release.wait(10)
        return super().encode_text(input_ids, attention_mask)


def png(colour: str = "red", size: int = 16) -> bytes:
    data = io.BytesIO()
    image(colour, size).save(data, format="PNG")
    return data.getvalue()


def pixel_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (it would decode to 30 GB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def colour_index(root, model, counts=None):
    folder = image_folder(root / "photos", counts or {"red": 2, "green": 2, "blue": 2})
    build(model, [folder], root / "index", "oracle", workers=0)
    return Index.open(root / "index", model)


@pytest.fixture
def served(tmp_path):
    model = ServeOracle()
    with TestClient(create_app(colour_index(tmp_path, model))) as client:
        yield client


def upload(colour_or_bytes, **fields):
    data = png(colour_or_bytes) if isinstance(colour_or_bytes, str) else colour_or_bytes
    return {"files": {"image": ("query.png", data, "image/png")}, "data": fields}


def test_search_by_text_and_by_image_with_thumbnails_of_the_hits(served):
    answer = served.get("/api/search", params={"q": "a photo of something green", "k": 2})
    assert answer.status_code == 200
    hits = answer.json()["results"]
    assert [hit["path"].split("/")[-2] for hit in hits] == ["green", "green"] and hits[0]["score"] == 1.0
    assert set(hits[0]) == {"id", "path", "caption", "score", "thumbnail"}
    thumbnail = served.get(hits[0]["thumbnail"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).convert("RGB").getpixel((0, 0)) == pytest.approx(
        COLOURS["green"], abs=8
    )
    by_image = served.post("/api/search/image", **upload("blue", k=3)).json()["results"]
    assert [hit["path"].split("/")[-2] for hit in by_image][:2] == ["blue", "blue"] and len(by_image) == 3


def test_classify_caption_and_ask_about_an_upload(served):
    labels = served.post("/api/classify", **upload("red", labels="blue, red, green", top_k=2)).json()["labels"]
    assert labels[0]["label"] == "red"
    assert len(labels) == 2 and labels[0]["probability"] == pytest.approx(1.0, abs=1e-4)
    many = ",".join(f"red {i}" for i in range(12))  # more labels than the classifier's default top 5
    assert len(served.post("/api/classify", **upload("red", labels=many, top_k=12)).json()["labels"]) == 12
    assert served.post("/api/caption", **upload("green")).json() == {"caption": "a green square"}
    assert served.post("/api/ask", **upload("blue", question="what colour is it?")).json() == {"answer": "blue"}


def test_info_health_docs_and_page(served):
    info = served.get("/api/info").json()
    assert info["images"] == 6 and info["model"] == "oracle"
    assert info["abilities"] == {"classify": True, "search": True, "caption": True, "ask": True}
    assert info["limits"]["max_upload_bytes"] == 10 * 2**20
    assert served.get("/healthz").json() == {"status": "ok", "images": 6}
    paths = served.get("/openapi.json").json()["paths"]
    for path in ("/api/search", "/api/search/image", "/api/classify", "/api/caption", "/api/ask", "/healthz"):
        assert path in paths
    assert "/api/thumbnail/{id}" in paths
    docs = served.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text  # the API page works offline
    for asset in ("/docs-files/swagger-ui-bundle.js", "/docs-files/swagger-ui.css"):
        assert asset in docs.text and served.get(asset).status_code == 200
    page = served.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and 'type="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace('href="/docs"', "")  # no CDN: everything from this server
    script = served.get("/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")


def test_a_model_without_an_ability_answers_422_naming_recipes_that_can(tmp_path):
    model = ScaledOracle()  # searches and classifies; cannot caption or answer
    with TestClient(create_app(colour_index(tmp_path, model))) as client:
        assert client.get("/api/info").json()["abilities"] == {
            "classify": True,
            "search": True,
            "caption": False,
            "ask": False,
        }
        for path, fields in (("/api/caption", {}), ("/api/ask", {"question": "what colour?"})):
            answer = client.post(path, **upload("red", **fields))
            assert answer.status_code == 422 and "cannot" in answer.json()["detail"]
            assert "recipes that can" in answer.json()["detail"]
        assert client.post("/api/classify", **upload("red", labels="red,blue")).status_code == 200


def test_a_failing_model_call_answers_500_and_the_server_keeps_serving(served):
    # The oracle's tokenizer raises StopIteration on a text without a colour word: a model bug
    # that asyncio could not hand on to the waiting request, which would hang.
    with TestClient(served.app, raise_server_exceptions=False) as client:
        answer = client.post("/api/classify", **upload("red", labels="a circle"))
        assert answer.status_code == 500
        assert client.get("/api/search", params={"q": "no colour here"}).status_code == 500
        assert client.get("/api/search", params={"q": "red"}).status_code == 200


def test_a_request_that_fails_inside_a_batch_fails_no_other(tmp_path):
    model = BlockingOracle()
    app = create_app(colour_index(tmp_path, model))

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.get("/api/search", params={"q": "red"}))
            await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
            batch = [asyncio.create_task(client.get("/api/search", params={"q": q})) for q in ("green", "?", "blue")]
            await asyncio.sleep(0.1)
            model.release.set()
            return await asyncio.gather(first, *batch)

    assert [answer.status_code for answer in asyncio.run(main())] == [200, 200, 500, 200]


BAD_REQUESTS = [
    # (method, path, request arguments, status, words in the one-line detail)
    ("get", "/api/search", {"params": {"q": "   "}}, 400, "query is empty"),
    ("get", "/api/search", {"params": {"q": "red " * 300}}, 400, "at most 1000"),
    ("get", "/api/search", {}, 422, "q: Field required"),
    ("get", "/api/search", {"params": {"q": "red", "k": 0}}, 422, "k: Input should be greater than or equal to 1"),
    ("get", "/api/search", {"params": {"q": "red", "k": 101}}, 422, "k: Input should be less than"),
    ("get", "/api/search", {"params": {"q": "red", "k": "many"}}, 422, "k: Input should be a valid integer"),
    ("post", "/api/search/image", {}, 422, "image: Field required"),
    ("post", "/api/search/image", upload(b"just some text"), 415, "corrupt image"),
    ("post", "/api/search/image", upload(b""), 415, "corrupt image"),
    ("post", "/api/search/image", upload(png()[:40]), 415, "corrupt image"),  # truncated
    ("post", "/api/caption", upload(pixel_bomb()), 413, "image too large"),
    ("post", "/api/caption", upload(b"\0" * (10 * 2**20 + 1)), 413, "upload too large: over 10 MB"),
    ("post", "/api/classify", upload("red"), 422, "labels: Field required"),
    ("post", "/api/classify", upload("red", labels=" , ,"), 400, "labels: give at least one"),
    ("post", "/api/classify", upload("red", labels=",".join(map(str, range(101)))), 400, "at most 100"),
    ("post", "/api/classify", upload("red", labels="x" * 201), 400, "a label is 201 characters"),
    ("post", "/api/ask", upload("red", question=""), 422, "question: Field required"),
    ("post", "/api/ask", upload("red", question="  "), 400, "question is empty"),
    ("get", "/api/thumbnail/999", {}, 404, "no indexed image 999"),
]


@pytest.mark.parametrize(("method", "path", "arguments", "status", "detail"), BAD_REQUESTS)
def test_bad_requests_get_a_one_line_4xx_and_the_server_keeps_serving(served, method, path, arguments, status, detail):
    answer = getattr(served, method)(path, **arguments)
    assert answer.status_code == status, answer.text
    assert detail in answer.json()["detail"] and "\n" not in answer.json()["detail"]
    assert served.get("/api/search", params={"q": "red"}).json()["results"][0]["path"].split("/")[-2] == "red"


def test_uploads_over_the_cap_are_refused_before_they_are_read(served):
    huge = str(10**12)  # a Content-Length no one sends: refused at once, the body never read
    answer = served.post("/api/caption", content=b"", headers={"content-length": huge, "content-type": "image/png"})
    assert answer.status_code == 413 and "over 10 MB" in answer.json()["detail"]

    assert served.get("/healthz").status_code == 200


def test_an_upload_without_content_length_is_cut_off_at_the_cap(served):
    """A chunked 64 MB body, fed to the app at the ASGI level: refused after about 10 MB read."""
    reads, sent = 0, []
    head = b"--b\r\nContent-Disposition: form-data; name=image; filename=x.png\r\n\r\n"

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": head if reads == 1 else b"\0" * 2**20, "more_body": reads < 65}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/caption",
        "raw_path": b"/api/caption",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(served.app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"over 10 MB" in sent[1]["body"]
    assert reads <= 12  # 10 MB and a bit: the other 54 MB were never read
    assert served.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/thumbnail/../../etc/passwd",
        "/api/thumbnail/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/thumbnail/%2Fetc%2Fpasswd",
        "/api/thumbnail//etc/passwd",
        "/api/thumbnail/-1",
        "/api/thumbnail/1.png",
        "/static/../serve.py",
        "/static/%2e%2e/serve.py",
        "/static/%2e%2e%2fserve.py",
        "/static/%2Fetc%2Fpasswd",
        "/static//etc/passwd",
        "/static/index.html/../../serve.py",
        "/etc/passwd",
        "/../../etc/passwd",
    ],
)
def test_no_path_outside_the_index_is_reachable(served, path):
    answer = served.get(path)
    assert answer.status_code == 404 and "root:" not in answer.text


def test_an_indexed_file_replaced_by_a_symlink_out_serves_nothing_of_its_target(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    index = colour_index(tmp_path, ServeOracle(), {"red": 1})
    (photo,) = [hit["path"] for hit in index.search("red", k=1)]
    with TestClient(create_app(index)) as client:
        (tmp_path / "photos" / "red" / "0.png").unlink()
        (tmp_path / "photos" / "red" / "0.png").symlink_to(secret)
        answer = client.get("/api/thumbnail/1")
        assert answer.status_code == 404 and "secret" not in answer.text and photo.endswith("0.png")


def run_concurrently(app, requests):
    """Send `requests` [(method, path, kwargs)] at once to `app`; their responses in order."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(client.request(m, p, **kw) for m, p, kw in requests))

    return asyncio.run(main())


def test_requests_past_the_limits_get_503_and_model_work_is_off_the_event_loop(tmp_path):
    model = BlockingOracle()
    limits = Limits(max_in_flight=2, max_waiting=2, max_wait_s=5)
    app = create_app(colour_index(tmp_path, model), limits=limits)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            search = [asyncio.create_task(client.get("/api/search", params={"q": c})) for c in ("red", "green")]
            await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
            # The model is busy on its thread, yet the event loop answers at once:
            assert (await client.get("/healthz")).status_code == 200
            waiting = [asyncio.create_task(client.get("/api/search", params={"q": "blue"})) for _ in range(2)]
            await asyncio.sleep(0.1)
            refused = await client.get("/api/search", params={"q": "red"})  # 2 running, 2 waiting: full
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json() == {"detail": "server busy: try again shortly"}
            model.release.set()
            answers = await asyncio.gather(*search, *waiting)
            assert [a.status_code for a in answers] == [200] * 4
            colours = [a.json()["results"][0]["path"].split("/")[-2] for a in answers]
            assert colours == ["red", "green", "blue", "blue"]
            assert (await client.get("/api/search", params={"q": "green"})).status_code == 200  # still serving

    asyncio.run(main())


def test_a_request_waiting_too_long_gets_503(tmp_path):
    model = BlockingOracle()
    app = create_app(colour_index(tmp_path, model), limits=Limits(max_in_flight=1, max_wait_s=0.2))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.get("/api/search", params={"q": "red"}))
            await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
            late = await client.get("/api/search", params={"q": "green"})
            model.release.set()
            assert late.status_code == 503 and (await first).status_code == 200

    asyncio.run(main())


def test_concurrent_text_searches_share_one_encoder_call_each_getting_its_own_answer(tmp_path):
    model = BlockingOracle()
    app = create_app(colour_index(tmp_path, model), limits=Limits(max_in_flight=8))
    batcher = app.state.worker.batchers["search"]
    queries = ["red", "green", "blue", "green", "red", "blue"]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.get("/api/search", params={"q": "blue", "k": 1}))
            await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
            rest = [asyncio.create_task(client.get("/api/search", params={"q": q, "k": 1})) for q in queries]
            await asyncio.sleep(0.1)
            model.release.set()
            return await asyncio.gather(first, *rest)

    answers = asyncio.run(main())
    colours = [a.json()["results"][0]["path"].split("/")[-2] for a in answers]
    assert colours == ["blue", *queries]
    assert batcher.calls == 2  # the first alone; the six that came while it ran, together


def test_serve_command_help_and_a_one_line_error_without_the_extra(monkeypatch):
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "--port" in result.output and "127.0.0.1" in result.output
    monkeypatch.delitem(sys.modules, "vlp.apps.serve", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    result = CliRunner().invoke(cli, ["serve", "some.index"])
    assert result.exit_code == 1 and "pip install 'vlp[serve]'" in result.output


@contextmanager
def live_server(app) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def raw_get(url: str, path: str) -> bytes:
    """The status line of GET `path` sent byte for byte (no client normalising `..`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return conn.recv(65536).split(b"\r\n", 1)[0]


def test_a_live_server_refuses_raw_traversals_and_endless_uploads_and_keeps_serving(tmp_path):
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"  # loopback unless told
    with live_server(create_app(colour_index(tmp_path, ServeOracle()))) as url:
        for path in ("/static/../serve.py", "/static/..%2fserve.py", "/api/thumbnail/../../etc/passwd", "//etc/passwd"):
            assert raw_get(url, path) == b"HTTP/1.1 404 Not Found", path
        sent = 0

        def endless():
            nonlocal sent
            yield b"--b\r\nContent-Disposition: form-data; name=image; filename=x.png\r\n\r\n"
            while sent < 2**30:
                sent += 2**20
                yield b"\0" * 2**20

        try:
            answer = httpx.post(
                f"{url}/api/caption", content=endless(), headers={"content-type": "multipart/form-data; boundary=b"}
            )
            assert answer.status_code == 413
        except httpx.TransportError:
            pass  # the server answered 413 and closed the connection while the client was still sending
        assert sent < 64 * 2**20  # of the 1 GB the client would have sent
        assert (
            httpx.get(f"{url}/api/search", params={"q": "blue"}).json()["results"][0]["path"].split("/")[-2] == "blue"
        )
