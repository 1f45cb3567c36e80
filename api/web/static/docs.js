// Swagger UI over this service's own OpenAPI document, from the npm package installed at set-up (no CDN):
// the reference works on a machine with no internet, and the page runs no inline script.
/* global SwaggerUIBundle */
window.ui = SwaggerUIBundle({
  url: "/api/v1/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  docExpansion: "list",
  defaultModelsExpandDepth: 0,
  tryItOutEnabled: false,
  validatorUrl: null, // the default sends the document to swagger.io to be checked
});
