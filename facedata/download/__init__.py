"""The download step: fetch, decode and filter each planned sample's image."""
