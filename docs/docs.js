// Swagger UI on this service's own /openapi.json: "Authorize" takes a token (never stored: a reload
// forgets it), "Try it out" sends the request to this origin. Nothing is fetched from elsewhere: no
// validator badge (validatorUrl: null), no external assets.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    deepLinking: true,
    displayRequestDuration: true,
    persistAuthorization: false,
    validatorUrl: null,
  });
});
