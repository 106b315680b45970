"""Routes: DOT's endpoints under /o/, and one protected resource to test a token against."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from oauth2_provider.views.generic import ProtectedResourceView


class Hello(ProtectedResourceView):  # type: ignore[misc]  # django has no type stubs here
    """200 with a valid access token, 403 otherwise (DOT's protected view)."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        """Say hello to the token's user."""
        return JsonResponse({"hello": str(request.resource_owner)})


urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("api/hello", Hello.as_view()),
]
