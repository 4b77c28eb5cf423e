"""Check image inputs in API request bodies before Gradio reads them.

Gradio prepares every input before the kit's validator runs. It opens each uploaded image
(Pillow raises on a 30000x30000 header, and a non-RGB image is decoded in full to convert
it). It downloads any ``http(s)`` URL given as a file path, and it decodes data URLs. So the
kit checks image inputs here, in the middleware, on the JSON body of the routes that start a job:

- a data URL or an http(s) URL (a bare string, or the ``path``/``url`` of a FileData) is
  decoded or fetched by the kit within its size, time and address rules. The image goes into
  Gradio's upload folder, and the body is rewritten to name that file;
- every uploaded image is checked from its header (allowed format, pixel limit);
- a URL in any other file input is rejected, so Gradio never fetches one.

A rejection gets the same response as a failed Gradio validator (HTTP 422 with a ``validate`` detail),
which gradio_client raises as ``ValidationError`` and the browser shows on the input.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from kit.errors import InvalidRequest
from kit.images import read_header
from kit.security.fetch import decode_data_url

logger = logging.getLogger(__name__)

# Routes whose JSON body carries a job's inputs (Gradio 6.31), with the endpoint name if any.
JOB_ROUTE = re.compile(r"^/gradio_api/(?:queue/join|call/v2/(?P<v2>[^/]+)|(?:call|run|api)/(?P<name>[^/]+))/?$")
INPUTS_FOLDER = "kit-inputs"
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
_FILE_META = {"_type": "gradio.FileData"}


def is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value[:5].lower() == "data:"


def validation_detail(parameter: str, message: str) -> dict[str, Any]:
    """Return a 422 body in the shape of a failed Gradio validator, which gradio_client understands."""
    return {"detail": [{"__type__": "validate", "is_valid": False, "message": message, "parameter_name": parameter}]}


def _find_function(blocks: Any, payload: dict[str, Any], api_name: str | None) -> Any:
    # The browser posts events without an API name to /gradio_api/run/predict with an fn_index.
    if api_name:
        for fn in blocks.fns.values():
            if fn.api_name == api_name:
                return fn
    index = payload.get("fn_index")
    return blocks.fns.get(index) if isinstance(index, int) else None


def _parameter_names(fn: Any) -> list[str]:
    names = list(getattr(fn, "input_parameter_names", None) or [])
    if not names and fn.fn is not None:
        try:
            names = list(inspect.signature(fn.fn).parameters)
        except (TypeError, ValueError):
            names = []
    return [names[i] if i < len(names) else f"parameter_{i}" for i in range(len(fn.inputs))]


class InputGate:
    """Rewrites and checks the image inputs of one job request body."""

    def __init__(self, guard: Any, upload_dir: str | Path):
        self.guard = guard
        self.upload_dir = Path(os.path.realpath(upload_dir))

    async def check(self, blocks: Any, path: str, payload: Any) -> Any:
        """Return the payload, rewritten where it carried URLs; raise InvalidRequest to reject it."""
        import gradio as gr

        match = JOB_ROUTE.match(path)
        if match is None or not isinstance(payload, dict):
            return payload
        fn = _find_function(blocks, payload, match.group("v2") or match.group("name"))
        if fn is None:
            self._reject_file_urls(payload, "data")
            return payload
        names = _parameter_names(fn)
        images = {names[i] for i, block in enumerate(fn.inputs) if isinstance(block, gr.Image)}

        if match.group("v2"):  # keyword body: {"prompt": ..., "init_image": ...}
            for name in list(payload):
                if name in images:
                    payload[name] = await self._prepare_image(payload[name], name)
                else:
                    self._reject_file_urls(payload[name], name)
            return payload

        data = payload.get("data")
        if not isinstance(data, list):
            return payload
        inputs = list(fn.inputs)
        visible = [block for block in inputs if not block.skip_api]
        # The simple /call/NAME format leaves out inputs that the API does not show (gr.State).
        positions = visible if len(data) == len(visible) and len(data) != len(inputs) else inputs
        for index, block in enumerate(positions[: len(data)]):
            name = names[inputs.index(block)]
            if name in images:
                data[index] = await self._prepare_image(data[index], name)
            else:
                self._reject_file_urls(data[index], name)
        return payload

    def _reject_file_urls(self, value: Any, parameter: str) -> None:
        """Reject URLs in file inputs that are not images: Gradio would download them itself."""
        if isinstance(value, dict):
            if is_http_url(value.get("path")) or is_data_url(value.get("path")) or is_data_url(value.get("url")):
                raise InvalidRequest(parameter, f"{parameter}: URLs are accepted only for image inputs; upload the file.")
            for item in value.values():
                self._reject_file_urls(item, parameter)
        elif isinstance(value, list):
            for item in value:
                self._reject_file_urls(item, parameter)

    async def _prepare_image(self, value: Any, parameter: str) -> Any:
        if isinstance(value, str):
            if is_data_url(value):
                return await self._store(decode_data_url(value, parameter, self.guard.max_upload_bytes), parameter)
            if is_http_url(value):
                return await self._store((await self.guard.fetcher.fetch(value, parameter)).content, parameter)
            return value
        if not isinstance(value, dict):
            return value
        path, url = value.get("path"), value.get("url")
        if is_http_url(path):
            return await self._store((await self.guard.fetcher.fetch(path, parameter)).content, parameter)
        if is_data_url(path) or is_data_url(url):
            source = path if is_data_url(path) else url
            return await self._store(decode_data_url(source, parameter, self.guard.max_upload_bytes), parameter)
        if isinstance(path, str) and self._is_upload(path):
            await asyncio.to_thread(read_header, path, parameter, self.guard.settings.max_input_pixels)
        # Paths outside the upload folder are left to Gradio, which rejects files it did not receive.
        return value

    def _is_upload(self, path: str) -> bool:
        real = Path(os.path.realpath(path))
        return self.upload_dir in real.parents

    async def _store(self, content: bytes, parameter: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._write, content, parameter)

    def _write(self, content: bytes, parameter: str) -> dict[str, Any]:
        folder = self.upload_dir / INPUTS_FOLDER / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / "image.unchecked"
        staged.write_bytes(content)
        try:
            header = read_header(staged, parameter, self.guard.settings.max_input_pixels)
        except InvalidRequest:
            staged.unlink(missing_ok=True)
            folder.rmdir()
            raise
        extension = _EXTENSIONS[header.format]
        final = staged.with_name(f"image.{extension}")
        os.replace(staged, final)
        return {
            "path": str(final),
            "orig_name": final.name,
            "size": len(content),
            "mime_type": f"image/{'jpeg' if extension == 'jpg' else extension}",
            "meta": dict(_FILE_META),
        }
