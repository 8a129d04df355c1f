"""The preference model: Bradley-Terry loss and steps, calibration, its saved
form, and the one scorer every consumer of PM scores uses."""
