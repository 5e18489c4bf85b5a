"""`facedata explore`: a local web page to audit a run (funnel, reasons, facets, samples, identities)."""
