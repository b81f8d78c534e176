"""Human A/B rating of two `generate` outputs, as in the paper's human study: `build` makes a static
page that raters open from disk, `results` unblinds and aggregates the answers they export."""
