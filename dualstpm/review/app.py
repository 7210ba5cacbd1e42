"""The review page: a small FastAPI app with one Jinja template and a little vanilla JavaScript.

Why FastAPI with plain templates rather than Gradio: a fast pass over thousands of parts
needs keyboard shortcuts, one image loaded at a time and a list fetched a page at a time,
which are a few lines of plain HTML/JS and awkward to bend a component framework to; each
verdict is one JSON POST that the server makes durable (the log's fsync) before it
answers, so what the page shows as kept is on disk; and FastAPI, Starlette, uvicorn and
Jinja2 already come with MLflow, so the page adds no heavy dependency and no build step.
JSON bodies (a mask as base64) avoid a multipart parser.

HTTP interface (what the page uses; JSON errors are ``{"detail": message}``):

- ``GET /``: the page;
- ``GET /api/order``: ``{"order": [part ids in review order], "reviewed", "total", ...}``,
  computed when the page loads (so paging through it never skips a part), re-read from
  the log each time (another server's verdicts included);
- ``GET /api/parts?ids=3,1,2``: those parts (at most 200) with their current verdicts;
- ``GET /api/parts/{id}/overlay`` and ``/image``: the overlay PNG and the original image;
- ``POST /api/parts/{id}/verdict`` ``{"verdict": "good"|"defective", "note": str,
  "mask_png": base64|null}``: appends one line to the log; 409 when the image no longer
  exists or the mask does not fit it, 423 when the log needs a hand fix; nothing is
  written then.
"""

import base64
import binascii
import getpass
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dualstpm.errors import ConfigError, RunError
from dualstpm.review.log import ReviewLog, ReviewLogError, VerdictError, new_entry, save_mask
from dualstpm.review.parts import Part, Predictions, load_predictions, review_order
from dualstpm.rundir import review_dir

HERE = Path(__file__).parent
MAX_PAGE = 200  # parts per /api/parts request
MAX_NOTE = 4000  # characters
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHORTCUTS = (
    ("g", "good"), ("d", "defective"), ("n", "write a note (Enter saves it, Esc leaves the field)"),
    ("m", "attach a mask (PNG, the image's size)"), ("j / →", "next part"), ("k / ←", "previous part"),
    ("o", "original image / overlay"),
)


def default_reviewer() -> str:
    """The login name, the reviewer when --reviewer is not given."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise ConfigError("cannot tell who you are (no login name): pass --reviewer NAME") from None


@dataclass
class ReviewSession:
    """One review: the predictions, the log beside them, who reviews, which model scored them."""

    predictions: Predictions
    reviewer: str
    model: dict[str, Any]
    log: ReviewLog = field(init=False)

    def __post_init__(self) -> None:
        self.log = ReviewLog(review_dir(self.predictions.folder)).refresh()  # a bad log stops here, named
        self.by_id = {part.id: part for part in self.predictions.parts}

    @classmethod
    def open(cls, folder: Path, reviewer: str, model: dict[str, Any], base: Path | None = None) -> "ReviewSession":
        """Read the predictions and the log, `model` already described; raises DataError
        (a missing or bad table, a bad log line). The command uses :func:`open_review`."""
        return cls(load_predictions(folder, base), reviewer, model)

    def part(self, part_id: int) -> Part:
        """The part of row `part_id`; KeyError when there is none."""
        return self.by_id[part_id]

    def order(self) -> dict[str, Any]:
        """The review order now (after reading what others appended) and the counts."""
        current = self.log.refresh().current()
        ids = review_order(self.predictions.parts, current)
        reviewed = sum(1 for p in self.predictions.parts if p.image in current)
        return {"order": ids, "total": len(ids), "reviewed": reviewed,
                "unreadable": [{"path": path, "error": error} for path, error in self.predictions.unreadable]}

    def views(self, ids: list[int]) -> list[dict[str, Any]]:
        """What the page shows of each part (unknown ids skipped), with its current verdict."""
        self.log.refresh()
        current, history = self.log.current(), self.log.history()
        return [self._view(self.by_id[i], current, history) for i in ids if i in self.by_id]

    @staticmethod
    def _view(part: Part, current: dict[str, dict], history: dict[str, int]) -> dict[str, Any]:
        entry = current.get(part.image)
        verdict = None if entry is None else {k: entry.get(k) for k in ("verdict", "note", "reviewer", "time", "mask")}
        return {"id": part.id, "path": part.listed_path, "image": part.image, "name": "/".join(Path(part.listed_path).parts[-2:]),
                "score": part.score, "normalized_score": part.normalized_score, "label": part.label,
                "threshold": part.threshold, "exists": Path(part.image).is_file(), "verdict": verdict,
                "verdicts": history.get(part.image, 0)}

    def record(self, part_id: int, verdict: str, note: str, mask_png: bytes | None) -> dict[str, Any]:
        """Append one verdict for part `part_id` (its mask stored first); returns the part's
        new view. Raises KeyError (no such part), VerdictError (missing image, bad mask:
        nothing written) or ReviewLogError (the log needs a hand fix: nothing written)."""
        part = self.by_id[part_id]
        if not Path(part.image).is_file():
            raise VerdictError(f"{part.image} no longer exists: the verdict was not recorded (earlier verdicts "
                               "are kept). Put the image back, or skip this part")
        if mask_png is not None and verdict != "defective":
            raise VerdictError("a mask marks a defect: give it with the verdict `defective`, or leave it out")
        self.log.refresh()  # a log that needs fixing refuses before a mask is stored
        entry_id = uuid.uuid4().hex
        mask = None if mask_png is None else save_mask(self.log.folder, entry_id, mask_png, part.image)
        entry = new_entry(reviewer=self.reviewer, image=part.image, listed_path=part.listed_path, verdict=verdict,
                          note=note, mask=mask, score=part.score, normalized_score=part.normalized_score,
                          threshold=part.threshold, model_label=part.label, overlay=part.overlay,
                          predictions=self.predictions.table, model=self.model, entry_id=entry_id)
        self.log.append(entry)
        return self._view(part, self.log.current(), self.log.history())


def open_review(folder: Path, reviewer: str, scored_by: Callable[[], dict[str, Any]],
                base: Path | None = None) -> ReviewSession:
    """The review of `folder` by `reviewer`; `scored_by()` describes the model that scored
    the predictions (:func:`dualstpm.mlops.scored_by.scored_by`, whose cheap checks the
    caller has already run). The predictions and the log are read first, so a missing
    table or a hand-broken log is named before the registry is contacted. Raises
    DataError (the predictions or the log), and whatever `scored_by` raises."""
    predictions = load_predictions(folder, base)
    ReviewLog(review_dir(folder)).refresh()
    return ReviewSession(predictions, reviewer, scored_by())


def allowed_hosts(host: str) -> list[str]:
    """The names a request's ``Host`` header may carry: the loopback names and `host` (the
    address served on; IPv6 literals also in brackets, as a Host header writes them). Any
    other name is refused, so a page on another site cannot reach the server through a
    DNS name rebound to this machine (DNS rebinding)."""
    names = [*LOOPBACK, host]
    return list(dict.fromkeys([*names, *(f"[{name}]" for name in names if ":" in name)]))


def create_app(session: ReviewSession, host: str = "127.0.0.1"):
    """The FastAPI app serving `session` (routes: the module docstring) on `host`: a request
    whose Host header is not one of `allowed_hosts(host)` gets 400."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from fastapi.templating import Jinja2Templates
    from pydantic import BaseModel, Field
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    class VerdictIn(BaseModel):
        verdict: Literal["good", "defective"]
        note: str = Field("", max_length=MAX_NOTE)
        mask_png: str | None = None  # base64 of the PNG file

    app = FastAPI(title="dualstpm review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    @app.exception_handler(ReviewLogError)
    async def _log_error(_: Request, exc: ReviewLogError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=423)

    @app.exception_handler(VerdictError)
    async def _verdict_error(_: Request, exc: VerdictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    def lookup(part_id: int) -> Part:
        try:
            return session.part(part_id)
        except KeyError:
            raise HTTPException(404, f"no part {part_id} in {session.predictions.table}") from None

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        return templates.TemplateResponse(request, "review.html", {
            "folder": str(session.predictions.folder.absolute()), "reviewer": session.reviewer,
            "model": session.model, "log": str(session.log.path), "shortcuts": SHORTCUTS})

    @app.get("/api/order")
    def order() -> dict[str, Any]:
        return session.order()

    @app.get("/api/parts")
    def parts(ids: str = Query(..., description="comma-separated part ids")) -> list[dict[str, Any]]:
        try:
            wanted = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise HTTPException(400, f"ids={ids!r}: give part ids as integers separated by commas") from None
        if len(wanted) > MAX_PAGE:
            raise HTTPException(400, f"{len(wanted)} ids asked: at most {MAX_PAGE} per request")
        return session.views(wanted)

    @app.get("/api/parts/{part_id}/overlay")
    def overlay(part_id: int) -> FileResponse:
        return FileResponse(session.predictions.folder / lookup(part_id).overlay)

    @app.get("/api/parts/{part_id}/image")
    def image(part_id: int) -> FileResponse:
        part = lookup(part_id)
        if not Path(part.image).is_file():
            raise HTTPException(404, f"{part.image} no longer exists")
        return FileResponse(part.image)

    @app.post("/api/parts/{part_id}/verdict")
    def verdict(part_id: int, body: VerdictIn) -> dict[str, Any]:
        lookup(part_id)
        mask = None
        if body.mask_png:
            try:
                mask = base64.b64decode(body.mask_png, validate=True)
            except (binascii.Error, ValueError):
                raise VerdictError("the mask did not arrive as base64: upload it again") from None
        return session.record(part_id, body.verdict, body.note, mask)

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = any free port), ready for the server. Raises RunError
    naming the address and the fix when it cannot be bound (taken, not an address here)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RunError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program (or another review "
                       "server) holds that port, or the host is not an address of this machine; pass --port N "
                       "(0: any free port) or another --host") from None
    return sock


def serve(session: ReviewSession, host: str, port: int, say: Callable[[str], None] = print) -> None:
    """Serve the page until Ctrl+C or SIGTERM (uvicorn, one process). Every verdict is on
    disk when the page shows it kept, so stopping loses nothing."""
    import uvicorn

    sock = listening_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    counts = session.order()
    if host not in LOOPBACK:
        say(f"warning: listening on {host}, not only this machine: the page has no login, so anyone who can "
            "reach it can record verdicts under your name")
    skipped = len(counts["unreadable"])
    say(f"reviewing {counts['total']} parts ({counts['reviewed']} reviewed"
        f"{f', {skipped} unreadable rows skipped' if skipped else ''}) "
        f"of {session.predictions.table} as {session.reviewer}; verdicts go to {session.log.path}")
    say(f"open http://{shown}:{sock.getsockname()[1]}/  (Ctrl+C stops; every verdict is already on disk)")
    server = uvicorn.Server(uvicorn.Config(create_app(session, host), log_level="warning", access_log=False))
    server.run(sockets=[sock])
