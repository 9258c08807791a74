"""uvicorn's httptools protocol with a bound on the request head (URL plus headers).

With httptools, uvicorn keeps every header byte a client sends before the app (and its token
check) sees the request: 48 MB of headers were kept in a test. Past MAX_HEAD bytes the request
is answered 431 with the §9 error body and the connection closed.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD = 64 * 1024


class HeadTooLarge(Exception):
    pass


class BoundedHttpTools(HttpToolsProtocol):
    head_bytes = 0

    def on_message_begin(self) -> None:
        self.head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self.count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count(len(name) + len(value))
        super().on_header(name, value)

    def count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD:
            raise HeadTooLarge  # httptools turns it into a parser error: data_received answers and closes

    def send_400_response(self, msg: str) -> None:
        too_large = self.head_bytes > MAX_HEAD
        status = b"431 Request Header Fields Too Large" if too_large else b"400 Bad Request"
        message = f"request head over {MAX_HEAD} bytes" if too_large else "invalid HTTP request"
        body = b'{"error":{"code":"bad_request","message":"' + message.encode() + b'"}}'
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()
