import warnings as _warnings

# DuckDB 1.5's DataFrame export calls DataFrame.drop(inplace=True), which pandas 3.1 deprecates;
# nothing for our callers to change, so people should not see it on every query.
_warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame.drop is deprecated")
