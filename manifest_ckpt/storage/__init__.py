"""Where checkpoint bytes live: directories, tar archives, and the one Store protocol readers use."""
