"""Configuration of the HTTP gateway."""

from pydantic import Field, SecretStr

from ..settings import Settings


class GatewaySettings(Settings):
    gateway_host: str = Field(default="127.0.0.1", description="the address to listen on")
    gateway_port: int = Field(default=8080, ge=0, le=65535, description="the port to listen on")
    gateway_cors_origins: str = Field(
        default="", description="origins (comma-separated, or *) a browser page may call "
        "the gateway from; none when empty")
    gateway_token: SecretStr | None = Field(
        default=None, description="when set, every route but /health and the dashboard's "
        "page (its data routes do) demands `Authorization: Bearer <token>`")
    jaeger_ui_url: str | None = Field(
        default=None, description="the Jaeger UI's address (e.g. http://localhost:16686): "
        "the dashboard links each traced task to `<address>/trace/<trace id>`")
