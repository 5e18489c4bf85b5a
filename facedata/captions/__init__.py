"""The caption step: attribute predictions composed into face captions."""
