"""`vlp serve`: a web page and a JSON API over an index (docs/apps.md).

    create_app(Index.open("photos.index"))     # a FastAPI app; `serve` runs one under uvicorn

Search (text or image) uses the index's own model; caption, classify and ask use `model` (by
default the same one), each only where the model can. Every model call runs on one worker
thread, off the event loop; requests for the same kind of work that arrive while it is busy are
answered by one batched call (`Batcher`). The limits (`Limits`) answer with a 4xx and a one-line
{"detail"}: uploads are capped in bytes before they are read and in pixels before they are
decoded, at most `max_in_flight` API requests run at once and at most `max_waiting` wait (a
bounded time) for a turn; the rest get 503. Only indexed images are served, by row id, as
thumbnails re-encoded from the decoded image; static files come from a fixed table in memory,
so no path in a request ever reaches the file system.
"""

import asyncio
import io
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import anyio
import swagger_ui_bundle
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from vlp.apps.ability import ABILITIES, can, require
from vlp.apps.classify import classifier
from vlp.apps.index import Index
from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.formats import decode_image
from vlp.data.sample import DataError
from vlp.data.transforms import model_images
from vlp.eval.captioning import decoding_preset
from vlp.eval.encode import embed_texts
from vlp.models.recipe import Recipe

STATIC = Path(__file__).parent / "static"
PAGES = {"app.js": "text/javascript", "style.css": "text/css"}  # served under /static/
WORKING_SIDE = 1024  # uploads are shrunk to this longest side once decoded: bounded memory
THUMBNAIL_SIDE, THUMBNAIL_CACHE = 256, 512
T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how many may run; past them the answer is a 4xx or 503."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS  # checked on the image header, before decoding
    max_query_chars: int = 1000  # a search text or a question
    max_labels: int = 100
    max_label_chars: int = 200
    max_k: int = 100  # results per search
    max_in_flight: int = 8  # API requests running at once
    max_waiting: int = 32  # API requests waiting for one of those turns; more get 503 at once
    max_wait_s: float = 10.0  # how long one waits before it gets 503
    max_batch: int = 16  # requests answered by one model call (1: no batching)


class Hit(BaseModel):
    id: int
    path: str
    caption: str | None
    score: float
    thumbnail: str


class SearchAnswer(BaseModel):
    results: list[Hit]


class Label(BaseModel):
    label: str
    probability: float


class ClassifyAnswer(BaseModel):
    labels: list[Label]


class CaptionAnswer(BaseModel):
    caption: str


class AskAnswer(BaseModel):
    answer: str


class Info(BaseModel):
    images: int
    recipe: str
    model: str
    abilities: dict[str, bool]
    limits: dict[str, int | float]


class Batcher(Generic[T, R]):
    """`await batcher(item)` -> work([item, ...])[i], `work` run on `pool`: items that arrive
    while a call runs wait for it to end and then go together in the next (up to `max_batch`),
    so an idle server adds no delay and a busy one makes fewer, larger calls."""

    def __init__(self, work: Callable[[list[T]], list[R]], pool: Executor, max_batch: int):
        self.work, self.pool, self.max_batch = work, pool, max_batch
        self.pending: list[tuple[T, asyncio.Future]] = []
        self.drain: asyncio.Task | None = None
        self.calls = 0  # model calls made, for tests and the load bench

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((item, future))
        if self.drain is None:
            self.drain = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                results = await self._results(loop, [item for item, _ in batch])
                for (_, future), result in zip(batch, results):
                    if future.done():  # its request was cancelled (the client went away)
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self.drain = None

    async def _results(self, loop: asyncio.AbstractEventLoop, items: list[T]) -> list[R | Exception]:
        """work(items), or if that fails, each item alone: one bad request fails no other."""
        self.calls += 1
        try:
            return await loop.run_in_executor(self.pool, self.work, items)
        except Exception as err:
            if len(items) == 1:
                return [err]
        return [(await self._results(loop, [item]))[0] for item in items]


def _no_grad(work: Callable[[list[T]], list[R]]) -> Callable[[list[T]], list[R]]:
    """`work` without autograd, a StopIteration raised as RuntimeError (asyncio cannot pass a
    StopIteration on to a future: the request would never be answered)."""

    def run(items: list[T]) -> list[R]:
        try:
            with torch.no_grad():
                return work(items)
        except StopIteration as err:
            raise RuntimeError(f"StopIteration in {work.__name__}: {err}") from err

    return run


class Worker:
    """The model work of the app, each kind batched, all on one thread (torch gains nothing from
    concurrent calls on a few cores, and a model is not safe to call from two threads)."""

    def __init__(self, index: Index, model: Recipe, max_batch: int):
        self.index, self.model = index, model
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vlp-model")
        self.abilities = {name: can(index.model if name == "search" else model, name) for name in ABILITIES}
        kinds = {
            "search": self._search_texts,
            "search_image": self._search_images,
            "caption": self._caption,
            "classify": self._classify,
            "ask": self._ask,
        }
        self.batchers = {name: Batcher(_no_grad(work), self.pool, max_batch) for name, work in kinds.items()}
        self._classifier = lru_cache(maxsize=16)(lambda labels: classifier(model, labels, top_k=len(labels)))

    async def run(self, kind: str, item: Any) -> Any:
        ability = "search" if kind == "search_image" else kind
        if not self.abilities[ability]:
            try:
                require(self.index.model if ability == "search" else self.model, ability)
            except TypeError as err:
                raise HTTPException(422, str(err)) from None
        return await self.batchers[kind](item)

    def _search_texts(self, items: list[tuple[str, int]]) -> list[list[dict]]:
        return self.index.search_vectors(
            embed_texts(self.index.model, [text for text, _ in items]), [k for _, k in items]
        )

    def _search_images(self, items: list[tuple[Image.Image, int]]) -> list[list[dict]]:
        images = model_images(self.index.model, [image for image, _ in items])
        return self.index.search_vectors(self.index.model.encode_image(images).cpu(), [k for _, k in items])

    def _caption(self, images: list[Image.Image]) -> list[str]:
        return self.model.caption(model_images(self.model, images), prompt=None, **decoding_preset("beam"))

    def _classify(self, items: list[tuple[tuple[str, ...], Image.Image]]) -> list[list[tuple[str, float]]]:
        """One call per distinct label set in the batch."""
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, (labels, _) in enumerate(items):
            groups[labels].append(i)
        results: list = [None] * len(items)
        for labels, members in groups.items():
            for i, labelled in zip(members, self._classifier(labels)([items[i][1] for i in members])):
                results[i] = labelled
        return results

    def _ask(self, items: list[tuple[Image.Image, str]]) -> list[str]:
        images = model_images(self.model, [image for image, _ in items])
        return self.model.answer_texts(images, [question for _, question in items])


class Thumbnails:
    """Thumbnails of indexed rows as JPEG bytes, the most recent `THUMBNAIL_CACHE` kept."""

    def __init__(self, index: Index, max_pixels: int):
        self.index, self.max_pixels = index, max_pixels
        self.cache: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, id: int) -> bytes:
        if id in self.cache:
            self.cache.move_to_end(id)
            return self.cache[id]
        image = self.index.image(id, self.max_pixels)  # KeyError: no such row
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        data = io.BytesIO()
        image.save(data, format="JPEG", quality=85)
        self.cache[id] = data.getvalue()
        while len(self.cache) > THUMBNAIL_CACHE:
            self.cache.popitem(last=False)
        return self.cache[id]


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers)


CLOSE = {"Connection": "close"}  # else the server would read and drop the rest of the body to reuse the connection


class _BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, told by Content-Length before
    anything is read, else by counting the bytes as they arrive (the rest is never read)."""

    def __init__(self, app, limit: int, upload_bytes: int):
        self.app, self.limit, self.detail = app, limit, f"upload too large: over {_size(upload_bytes)}"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            detail = self.detail if length.isdigit() else "bad Content-Length"
            return await _error(413 if length.isdigit() else 400, detail, CLOSE)(scope, receive, send)
        received, over, started = 0, False, False

        async def counting_receive():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                over = True
                raise DataError(self.detail)  # ends the app's reading; its answer is replaced
            return message

        async def guarded_send(message):
            nonlocal started
            if not over:
                started = True
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _error(413, self.detail, CLOSE)(scope, receive, send)


class _Gate:
    """ASGI middleware: at most `max_in_flight` /api/ requests at once; up to `max_waiting` more
    wait at most `max_wait_s` for a turn, and the others get 503 with Retry-After."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.slots: anyio.Semaphore | None = None  # made on the first request, inside the event loop
        self.waiting = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        if self.slots is None:
            self.slots = anyio.Semaphore(self.limits.max_in_flight)
        busy = _error(503, "server busy: try again shortly", {"Retry-After": "1"})
        if self.slots.value == 0 and self.waiting >= self.limits.max_waiting:
            return await busy(scope, receive, send)
        self.waiting += 1
        try:
            with anyio.move_on_after(self.limits.max_wait_s) as waited:
                await self.slots.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:
            return await busy(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()


def _size(count: int) -> str:
    return f"{count / 2**20:g} MB" if count >= 2**20 else f"{count} bytes"


def _text(value: str, what: str, limit: int) -> str:
    """`value` stripped; 400 if that is empty or longer than `limit` characters."""
    value = value.strip()
    if not value:
        raise HTTPException(400, f"{what} is empty")
    if len(value) > limit:
        raise HTTPException(400, f"{what} is {len(value)} characters long, at most {limit}")
    return value


def _labels(text: str, limits: Limits) -> tuple[str, ...]:
    """Comma-separated labels, stripped, duplicates dropped; 400 if none or too many."""
    labels = tuple(dict.fromkeys(label.strip() for label in text.split(",") if label.strip()))
    if not labels:
        raise HTTPException(400, "labels: give at least one, comma-separated")
    if len(labels) > limits.max_labels:
        raise HTTPException(400, f"labels: {len(labels)} given, at most {limits.max_labels}")
    for label in labels:
        _text(label, "a label", limits.max_label_chars)
    return labels


def _decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes as an RGB image of at most WORKING_SIDE pixels a side; 413 over the pixel
    cap, 415 if they are not a readable image."""
    try:
        image = decode_image(data, "upload", max_pixels)
    except DataError as err:
        raise HTTPException(413 if "image too large" in str(err) else 415, str(err)) from None
    image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BICUBIC)
    return image


def create_app(index: Index, model: Recipe | None = None, limits: Limits = Limits()) -> FastAPI:
    """The app over `index`: the page at /, the JSON API under /api/, /healthz and /docs.
    `model` captions, classifies and answers (default: the index's model)."""
    worker = Worker(index, index.model if model is None else model, limits.max_batch)
    files = ThreadPoolExecutor(2, thread_name_prefix="vlp-files")  # decoding uploads, thumbnails
    thumbnails = Thumbnails(index, limits.max_pixels)
    page = (STATIC / "index.html").read_text()
    static = {name: ((STATIC / name).read_bytes(), kind) for name, kind in PAGES.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.pool.shutdown(cancel_futures=True)
        files.shutdown(cancel_futures=True)

    app = FastAPI(
        title="vlp serve",
        summary=f"Search {len(index)} images by text or by image; caption, label and ask about an image.",
        lifespan=lifespan,
        docs_url=None,  # served below from swagger-ui-bundle's files: FastAPI's page loads them from a CDN
    )
    app.mount("/docs-files", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-files")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="vlp serve API",
            swagger_js_url="/docs-files/swagger-ui-bundle.js",
            swagger_css_url="/docs-files/swagger-ui.css",
            swagger_favicon_url="/docs-files/favicon-32x32.png",
        )

    app.state.worker = worker
    app.add_middleware(_Gate, limits=limits)
    app.add_middleware(_BodyLimit, limit=limits.max_upload_bytes + 64 * 2**10, upload_bytes=limits.max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def one_line(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"][1:]) or str(error["loc"][0])
        return _error(422, f"{where}: {error['msg']}")

    async def upload(image: UploadFile) -> Image.Image:
        data = await image.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"upload too large: over {_size(limits.max_upload_bytes)}")
        return await asyncio.get_running_loop().run_in_executor(files, _decode_upload, data, limits.max_pixels)

    def hits(results: list[dict]) -> SearchAnswer:
        return SearchAnswer(results=[Hit(**hit, thumbnail=f"/api/thumbnail/{hit['id']}") for hit in results])

    Image_ = Annotated[UploadFile, File(description="An image file (JPEG, PNG, WebP, ...).")]
    K = Annotated[int, Query(ge=1, le=limits.max_k, description="How many results.")]

    @app.get("/api/search", response_model=SearchAnswer, tags=["search"])
    async def search(q: Annotated[str, Query(description="A description, e.g. 'a red circle'.")], k: K = 10):
        """The indexed images that best match a text, best first."""
        return hits(await worker.run("search", (_text(q, "query", limits.max_query_chars), k)))

    @app.post("/api/search/image", response_model=SearchAnswer, tags=["search"])
    async def search_image(image: Image_, k: Annotated[int, Form(ge=1, le=limits.max_k)] = 10):
        """The indexed images most like an uploaded one, best first."""
        return hits(await worker.run("search_image", (await upload(image), k)))

    @app.post("/api/classify", response_model=ClassifyAnswer, tags=["image"])
    async def classify(
        image: Image_,
        labels: Annotated[str, Form(description="Comma-separated labels, e.g. 'a cat, a dog'.")],
        top_k: Annotated[int, Form(ge=1, le=limits.max_labels)] = 5,
    ):
        """Zero-shot labels of an uploaded image, most probable first."""
        names = _labels(labels, limits)
        labelled = await worker.run("classify", (names, await upload(image)))
        return ClassifyAnswer(labels=[Label(label=name, probability=p) for name, p in labelled[:top_k]])

    @app.post("/api/caption", response_model=CaptionAnswer, tags=["image"])
    async def caption(image: Image_):
        """A caption of an uploaded image (beam search, 3 beams)."""
        return CaptionAnswer(caption=await worker.run("caption", await upload(image)))

    @app.post("/api/ask", response_model=AskAnswer, tags=["image"])
    async def ask(image: Image_, question: Annotated[str, Form(description="e.g. 'what colour is the square?'")]):
        """The answer to a question about an uploaded image."""
        question = _text(question, "question", limits.max_query_chars)
        return AskAnswer(answer=await worker.run("ask", (await upload(image), question)))

    @app.get(
        "/api/thumbnail/{id:int}",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "No such indexed image."}},
        tags=["search"],
    )
    async def thumbnail(id: int):
        """A JPEG thumbnail of indexed image `id` (the "id" of a search result)."""
        try:
            data = await asyncio.get_running_loop().run_in_executor(files, thumbnails, id)
        except KeyError:
            raise HTTPException(404, f"no indexed image {id}") from None
        except DataError:
            raise HTTPException(404, f"indexed image {id} can no longer be read") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/info", response_model=Info, tags=["server"])
    async def info():
        """The index, the model's recipe, what it can do (search, classify, caption, ask) and the limits."""
        return Info(
            images=len(index),
            recipe=worker.model.recipe,
            model=str(index.info.get("model", "")),
            abilities=worker.abilities,
            limits=asdict(limits),
        )

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, Any]:
        """{"status": "ok", "images": count} while the server answers."""
        return {"status": "ok", "images": len(index)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:
            raise HTTPException(404, "Not Found")
        data, kind = static[name]
        return Response(data, media_type=kind, headers=PAGE_HEADERS)

    return app


PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


def serve(
    index_path: Path,
    model_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits = Limits(),
) -> None:
    """Run the app over the index at `index_path` under uvicorn until interrupted."""
    import uvicorn

    from vlp.api import load

    limits = limits or Limits()
    index = Index.open(index_path)
    app = create_app(index, load(model_path) if model_path else None, limits)
    # uvicorn's own cap on open connections and tasks: past it, 503 before the app sees a request
    backstop = limits.max_in_flight + limits.max_waiting + 64
    uvicorn.run(app, host=host, port=port, limit_concurrency=backstop, timeout_graceful_shutdown=5)
