"""Generate the project's own text sets (the committed .txt files beside this script).

  image_descriptions_3500.txt  3,500 short, varied image descriptions, built from the hand-written
                               vocabularies below (objects, scenes, colours, textures, shapes, counts, styles,
                               locations, moods, photo conditions, ...). Needs nothing; deterministic.
  common_words_3500.txt        the 3,500 most frequent English words      } from the word-frequency lists
  words_10000.txt              the 10,000 most frequent English words     } bundled in the `wordfreq` package

`wordfreq` is needed only to regenerate the word sets (pip install wordfreq); it is not a dependency of the
project. Words are lowercase ASCII letters only, at least two letters long, minus a hand-written list of
profanities and sexual terms; order is by frequency. See README.md here for sources and licences.

  python text_descriptions/make_text_sets.py             # all three
  python text_descriptions/make_text_sets.py --only descriptions
"""
import argparse
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- vocabularies
# (singular, plural)
OBJECTS = [
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("cow", "cows"), ("sheep", "sheep"), ("goat", "goats"),
    ("bird", "birds"), ("duck", "ducks"), ("owl", "owls"), ("parrot", "parrots"), ("eagle", "eagles"),
    ("fish", "fish"), ("butterfly", "butterflies"), ("bee", "bees"), ("spider", "spiders"), ("snake", "snakes"),
    ("frog", "frogs"), ("turtle", "turtles"), ("rabbit", "rabbits"), ("squirrel", "squirrels"), ("fox", "foxes"),
    ("deer", "deer"), ("bear", "bears"), ("elephant", "elephants"), ("giraffe", "giraffes"), ("zebra", "zebras"),
    ("lion", "lions"), ("tiger", "tigers"), ("monkey", "monkeys"), ("camel", "camels"), ("penguin", "penguins"),
    ("dolphin", "dolphins"), ("whale", "whales"), ("crab", "crabs"), ("snail", "snails"),
    ("tree", "trees"), ("flower", "flowers"), ("rose", "roses"), ("sunflower", "sunflowers"), ("cactus", "cacti"),
    ("mushroom", "mushrooms"), ("leaf", "leaves"), ("palm tree", "palm trees"), ("fern", "ferns"),
    ("apple", "apples"), ("banana", "bananas"), ("orange", "oranges"), ("lemon", "lemons"), ("pumpkin", "pumpkins"),
    ("loaf of bread", "loaves of bread"), ("cake", "cakes"), ("pizza", "pizzas"), ("bowl of soup", "bowls of soup"),
    ("cup of coffee", "cups of coffee"), ("teapot", "teapots"), ("bottle", "bottles"), ("glass", "glasses"),
    ("plate", "plates"), ("spoon", "spoons"), ("knife", "knives"), ("basket", "baskets"),
    ("car", "cars"), ("bicycle", "bicycles"), ("motorcycle", "motorcycles"), ("bus", "buses"), ("truck", "trucks"),
    ("train", "trains"), ("boat", "boats"), ("sailboat", "sailboats"), ("airplane", "airplanes"),
    ("helicopter", "helicopters"), ("tractor", "tractors"), ("scooter", "scooters"), ("canoe", "canoes"),
    ("chair", "chairs"), ("table", "tables"), ("sofa", "sofas"), ("bed", "beds"), ("lamp", "lamps"),
    ("clock", "clocks"), ("mirror", "mirrors"), ("window", "windows"), ("door", "doors"), ("staircase", "staircases"),
    ("bookshelf", "bookshelves"), ("book", "books"), ("candle", "candles"), ("vase", "vases"), ("pillow", "pillows"),
    ("umbrella", "umbrellas"), ("hat", "hats"), ("shoe", "shoes"), ("backpack", "backpacks"), ("scarf", "scarves"),
    ("jacket", "jackets"), ("dress", "dresses"), ("necklace", "necklaces"), ("watch", "watches"),
    ("guitar", "guitars"), ("piano", "pianos"), ("violin", "violins"), ("drum", "drums"), ("trumpet", "trumpets"),
    ("camera", "cameras"), ("laptop", "laptops"), ("phone", "phones"), ("television", "televisions"),
    ("keyboard", "keyboards"), ("headphones", "pairs of headphones"), ("robot", "robots"),
    ("ball", "balls"), ("kite", "kites"), ("balloon", "balloons"), ("teddy bear", "teddy bears"), ("toy car", "toy cars"),
    ("house", "houses"), ("cottage", "cottages"), ("castle", "castles"), ("church", "churches"), ("tower", "towers"),
    ("bridge", "bridges"), ("lighthouse", "lighthouses"), ("windmill", "windmills"), ("skyscraper", "skyscrapers"),
    ("tent", "tents"), ("fountain", "fountains"), ("statue", "statues"), ("fence", "fences"), ("bench", "benches"),
    ("street lamp", "street lamps"), ("mailbox", "mailboxes"), ("traffic light", "traffic lights"),
    ("man", "men"), ("woman", "women"), ("child", "children"), ("baby", "babies"), ("old man", "old men"),
    ("girl", "girls"), ("boy", "boys"), ("chef", "chefs"), ("soldier", "soldiers"), ("dancer", "dancers"),
    ("musician", "musicians"), ("farmer", "farmers"), ("doctor", "doctors"), ("athlete", "athletes"),
    ("rock", "rocks"), ("shell", "shells"), ("feather", "feathers"), ("key", "keys"), ("coin", "coins"),
    ("map", "maps"), ("flag", "flags"), ("sign", "signs"), ("box", "boxes"), ("bag", "bags"), ("bucket", "buckets"),
]
LIVING = {"dog", "cat", "horse", "cow", "sheep", "goat", "bird", "duck", "owl", "parrot", "eagle", "fish",
          "butterfly", "bee", "spider", "snake", "frog", "turtle", "rabbit", "squirrel", "fox", "deer", "bear",
          "elephant", "giraffe", "zebra", "lion", "tiger", "monkey", "camel", "penguin", "dolphin", "whale", "crab",
          "snail", "man", "woman", "child", "baby", "old man", "girl", "boy", "chef", "soldier", "dancer",
          "musician", "farmer", "doctor", "athlete"}
PEOPLE = ["man", "woman", "child", "girl", "boy", "old man", "old woman", "couple", "family", "group of friends",
          "crowd", "soldier", "chef", "dancer", "musician", "farmer", "athlete", "tourist", "student", "worker"]
ACTIONS = ["running", "walking", "sitting", "sleeping", "reading a book", "eating", "laughing", "dancing", "swimming",
           "cooking", "riding a bicycle", "playing football", "playing the guitar", "taking a photo", "waving",
           "climbing", "jumping", "painting", "writing", "talking on the phone", "shopping", "fishing",
           "skiing", "surfing", "singing", "hugging", "crying", "working at a desk", "waiting for a bus",
           "holding an umbrella"]
ANIMAL_ACTIONS = ["sleeping", "running", "eating", "jumping", "swimming", "flying", "hiding", "resting",
                  "playing", "looking at the camera", "in the grass", "in the snow", "in the water", "on a branch"]
ANIMALS = ["dog", "cat", "horse", "cow", "bird", "duck", "owl", "fish", "butterfly", "rabbit", "squirrel", "fox",
           "deer", "bear", "elephant", "giraffe", "zebra", "lion", "tiger", "monkey", "penguin", "dolphin", "frog",
           "turtle", "goat", "sheep", "parrot", "eagle", "snake", "crab"]
SCENES = ["kitchen", "living room", "bedroom", "bathroom", "office", "classroom", "library", "hospital",
          "restaurant", "cafe", "bar", "supermarket", "market", "shopping mall", "train station", "airport",
          "parking lot", "garage", "factory", "warehouse", "laboratory", "gym", "swimming pool", "stadium",
          "concert hall", "theater", "museum", "church", "temple", "castle", "farm", "barn", "garden", "park",
          "playground", "zoo", "forest", "jungle", "desert", "beach", "harbor", "lake", "river", "waterfall",
          "mountain range", "valley", "meadow", "field of wheat", "vineyard", "cave", "canyon", "glacier",
          "island", "swamp", "city street", "alley", "highway", "bridge", "subway", "rooftop", "backyard",
          "village", "small town", "big city", "construction site", "cemetery", "campsite", "ski resort",
          "coral reef", "snowy field"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
           "golden", "silver", "beige", "turquoise", "navy blue", "dark green", "light blue", "bright red",
           "pale yellow", "crimson", "violet", "teal", "maroon", "cream-colored"]
PALETTES = ["warm colors", "cool colors", "pastel colors", "muted colors", "vivid colors", "earth tones",
            "neon colors", "black and white", "red and gold", "blue and white", "green and brown",
            "pink and purple", "orange and teal", "shades of gray", "shades of blue", "a single dominant color",
            "high contrast", "low contrast", "a monochrome palette", "complementary colors"]
TEXTURES = ["wood", "stone", "brick", "concrete", "marble", "metal", "rust", "glass", "sand", "grass", "moss",
            "fur", "feathers", "scales", "leather", "silk", "wool", "denim", "velvet", "lace", "paper", "cardboard",
            "ice", "snow", "water ripples", "clouds", "tree bark", "cracked earth", "gravel", "plastic", "rubber",
            "foam", "smoke", "knitted fabric", "woven straw", "peeling paint", "polished chrome", "dry leaves"]
SURFACE = ["rough", "smooth", "shiny", "matte", "wet", "dusty", "glossy", "fuzzy", "bumpy", "cracked",
           "wrinkled", "soft", "grainy", "slippery", "jagged"]
SHAPES = ["circles", "squares", "triangles", "spirals", "stripes", "dots", "zigzags", "hexagons", "stars",
          "hearts", "arches", "curves", "straight lines", "diagonal lines", "concentric rings", "waves",
          "grids", "crosses", "diamonds", "rectangles"]
SHAPE_ADJ = ["round", "square", "triangular", "oval", "curved", "spiral", "rectangular", "cylindrical",
             "symmetrical", "asymmetrical", "angular", "pointed", "flat", "tall and narrow", "wide and low"]
PATTERNS = ["polka dot", "checkered", "striped", "floral", "plaid", "paisley", "geometric", "camouflage",
            "leopard print", "zebra print", "honeycomb", "herringbone", "tie-dye", "mosaic", "tartan"]
COUNTS = ["two", "three", "four", "five", "six", "many", "a few", "dozens of", "a pair of", "a row of",
          "a pile of", "a group of", "hundreds of"]
STYLES = ["watercolor painting", "oil painting", "pencil sketch", "charcoal drawing", "ink drawing",
          "cartoon", "comic book illustration", "anime drawing", "pixel art image", "3D render", "low-poly render",
          "vintage photograph", "black and white photograph", "polaroid photo", "mosaic", "stained glass image",
          "collage", "graffiti mural", "children's drawing", "technical drawing", "blueprint", "woodcut print",
          "embroidery", "origami model", "clay sculpture", "marble statue", "neon sign", "poster",
          "postcard", "infographic", "satellite image", "x-ray image", "thermal image", "microscope image",
          "tattoo design", "logo", "emoji", "sticker", "silhouette", "impressionist painting",
          "cubist painting", "pop art print", "abstract painting", "minimalist illustration", "ukiyo-e print"]
LOCATIONS = ["Paris", "London", "New York", "Tokyo", "Rome", "Venice", "Istanbul", "Cairo", "Rio de Janeiro",
             "Mexico City", "Sydney", "Mumbai", "Beijing", "Moscow", "Cape Town", "Marrakesh", "Bangkok",
             "Amsterdam", "Barcelona", "San Francisco", "Las Vegas", "Havana", "Jerusalem", "Kyoto", "Dubai",
             "Iceland", "Norway", "Scotland", "Ireland", "Switzerland", "the Alps", "the Himalayas", "the Sahara",
             "the Amazon rainforest", "the Arctic", "Antarctica", "Hawaii", "the Caribbean", "Greece", "Egypt",
             "India", "China", "Japan", "Mexico", "Peru", "Kenya", "Australia", "Canada", "Alaska", "Texas",
             "the Mediterranean", "Scandinavia", "the Middle East", "Southeast Asia", "the countryside",
             "a suburb", "a fishing village", "an old town", "a tropical island", "the mountains"]
MOODS = ["peaceful", "cheerful", "gloomy", "mysterious", "romantic", "nostalgic", "eerie", "festive",
         "lonely", "chaotic", "calm", "dramatic", "playful", "melancholic", "cozy", "tense", "dreamy",
         "serene", "joyful", "somber", "whimsical", "majestic", "spooky", "energetic", "intimate"]
CONDITIONS = ["at night", "at sunrise", "at sunset", "during golden hour", "at noon", "at dusk", "at dawn",
              "in the rain", "in the snow", "in fog", "during a storm", "under a cloudy sky", "under a clear blue sky",
              "in bright sunlight", "in dim light", "by candlelight", "under neon lights", "with a flash",
              "with backlighting", "in hard shadows", "from above", "from below", "from a low angle",
              "from far away", "from a drone", "through a window", "underwater", "with a wide-angle lens",
              "with a fisheye lens", "with a telephoto lens", "with a macro lens", "with a shallow depth of field",
              "with motion blur", "with a long exposure", "out of focus", "with lens flare", "in slow motion",
              "with a tilted horizon", "in portrait orientation", "in panoramic format", "with film grain",
              "overexposed", "underexposed", "in high resolution", "in low resolution", "with a vignette",
              "with a sepia filter", "with a reflection", "in a mirror", "in winter", "in spring",
              "in summer", "in autumn", "on a windy day", "on a hot day", "on a foggy morning"]
VIEWS = ["Close-up of", "Photo of", "Picture of", "Image of", "Snapshot of", "Detail of", "Aerial view of",
         "Side view of", "Top-down view of", "Blurry photo of", "Cropped photo of", "Portrait of"]
SIZES = ["tiny", "small", "large", "huge", "giant", "miniature", "tall", "long", "broken", "old", "new",
         "antique", "modern", "dirty", "clean", "wet", "shiny", "rusty", "wooden", "plastic", "metal",
         "handmade", "colorful", "faded", "empty", "full", "abandoned", "decorated"]
LIVING_SIZES = ["tiny", "small", "large", "huge", "young", "old", "wet", "sleepy", "curious", "happy", "tired",
                "muddy", "lonely", "proud", "scared", "hungry"]
SCENE_PEOPLE = ["crowded", "empty", "busy", "quiet", "abandoned", "brightly lit", "dark", "messy", "tidy",
                "flooded", "snow-covered", "sunlit", "ruined", "decorated", "modern", "old-fashioned"]


def article(phrase: str) -> str:
    """'a' or 'an' + phrase (by the first letter; good enough for this vocabulary)."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def description_pools() -> dict[str, list[str]]:
    """Every candidate description, by category (each list deterministic and free of duplicates)."""
    objs = [s for s, _ in OBJECTS]
    things = [o for o in objs if o not in LIVING]
    living = [o for o in objs if o in LIVING]
    pools: dict[str, list[str]] = {
        "object": [f"{v} {article(o)}" for v in VIEWS for o in objs],
        "object_size": [f"Image with {article(f'{a} {o}')}" for a in SIZES for o in things]
        + [f"Photo of {article(f'{a} {o}')}" for a in LIVING_SIZES for o in living],
        "colour": [f"Image with {article(f'{c} {o}')}" for c in COLOURS for o in objs],
        "palette": [f"Image with {p}" for p in PALETTES] + [f"Photo in {p}" for p in PALETTES]
        + [f"Illustration with {p}" for p in PALETTES],
        "texture": [f"Image with the texture of {t}" for t in TEXTURES] + [f"Close-up of {s} {t}" for s in SURFACE
                                                                          for t in TEXTURES],
        "shape": [f"Image with {s}" for s in SHAPES] + [f"Pattern of {c} {s}" for c in COLOURS for s in SHAPES]
        + [f"Photo of {article(f'{a} {o}')}" for a in SHAPE_ADJ for o in things],
        "pattern": [f"Image with a {p} pattern" for p in PATTERNS] + [f"{_cap(article(f'{p} {o}'))}" for p in PATTERNS
                                                                       for o in ("dress", "shirt", "scarf", "blanket",
                                                                                 "wallpaper", "tablecloth", "rug",
                                                                                 "umbrella", "bag", "curtain")],
        "count": [f"Image with {c} {p}" for c in COUNTS for _, p in OBJECTS] + [f"Image with one {o}" for o in objs],
        "style": [f"{_cap(article(s))} of {article(o)}" for s in STYLES for o in objs],
        "scene": [f"Picture taken in {article(s)}" for s in SCENES] + [f"Photo of {article(f'{a} {s}')}"
                                                                       for a in SCENE_PEOPLE for s in SCENES],
        "location": [f"Photo taken in {l}" for l in LOCATIONS] + [f"{_cap(article(o))} in {l}" for l in LOCATIONS
                                                                   for o in objs],
        "mood": [f"Image with a {m} mood" for m in MOODS] + [f"{_cap(m)} atmosphere" for m in MOODS]
        + [f"{_cap(article(f'{m} {s}'))}" for m in MOODS for s in SCENES],
        "condition": [f"Photo taken {c}" for c in CONDITIONS] + [f"Photo of {article(o)}, {c}" for c in CONDITIONS
                                                                  for o in objs],
        "action": [f"Photo of {article(p)} {a}" for p in PEOPLE for a in ACTIONS]
        + [f"{_cap(article(a))} {x}" for a in ANIMALS for x in ANIMAL_ACTIONS],
    }
    return {k: list(dict.fromkeys(v)) for k, v in pools.items()}


# how many descriptions of each kind (adds up to 3,500)
QUOTAS = {"object": 300, "object_size": 250, "colour": 300, "palette": 50, "texture": 250, "shape": 250,
          "pattern": 150, "count": 250, "style": 300, "scene": 300, "location": 250, "mood": 250,
          "condition": 300, "action": 300}


def make_descriptions(total: int = 3500, seed: int = 0) -> list[str]:
    """``total`` distinct descriptions, sampled by category quota with a fixed seed, then shuffled."""
    rng = random.Random(seed)
    pools = description_pools()
    if sum(QUOTAS.values()) != total:
        raise ValueError(f"quotas add up to {sum(QUOTAS.values())}, not {total}")
    chosen: list[str] = []
    seen: set[str] = set()
    for kind, quota in QUOTAS.items():
        pool = [p for p in pools[kind] if p.lower() not in seen]
        if len(pool) < quota:
            raise ValueError(f"category {kind}: only {len(pool)} candidates for a quota of {quota}")
        pick = rng.sample(pool, quota)
        chosen += pick
        seen |= {p.lower() for p in pick}
    rng.shuffle(chosen)
    return chosen


# ----------------------------------------------------------------------------- word sets
# Left out of the word sets: profanity, slurs and sexual terms (the raw frequency lists are web text).
BLOCKLIST = set("""
anal anus arse arsehole ass asses asshole assholes bastard bastards bitch bitches bitching blowjob blowjobs
bollocks boner boob boobs booty breasts butt butthole clit cock cocks coon crap cum cumshot cunt cunts damn
damned dick dicks dildo dyke erotic fag faggot faggots fags fetish fuck fucked fucker fuckers fuckin fucking
fucks goddamn handjob hentai homo hooker horny incest jerk jizz kinky lesbian lesbians masturbate
masturbation milf motherfucker motherfuckers naked negro nigga niggas nigger niggers nipple nipples nude
nudes nudity orgasm orgy penis piss pissed porn porno pornography prick pussies pussy queer rape raped rapes
raping rapist retard retarded scrotum semen sex sexual sexually sexy shemale shit shits shitty slut sluts
smut spank sperm stripper sucks testicles tit tits titties topless twat vagina viagra wank wanker whore
whores xxx
""".split())
WORD_RE = re.compile(r"^[a-z]{2,}$")


def make_words(n: int) -> list[str]:
    """The ``n`` most frequent English words in wordfreq's 'large' list, filtered (see module docstring)."""
    try:
        from wordfreq import top_n_list
    except ImportError as e:  # generation-time only
        raise SystemExit("the word sets are generated from the `wordfreq` package: pip install wordfreq") from e
    words = []
    for w in top_n_list("en", 4 * n, wordlist="large"):
        if WORD_RE.match(w) and w not in BLOCKLIST and w not in words:
            words.append(w)
            if len(words) == n:
                return words
    raise SystemExit(f"wordfreq gave fewer than {n} usable words")


def write(path: Path, lines: list[str]) -> None:
    assert len(lines) == len(set(lines)) and all(l.strip() for l in lines)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({len(lines)} lines)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["descriptions", "words"], default=None)
    parser.add_argument("--out", default=str(HERE), help="output folder")
    args = parser.parse_args()
    out = Path(args.out)
    if args.only in (None, "descriptions"):
        write(out / "image_descriptions_3500.txt", make_descriptions())
    if args.only in (None, "words"):
        write(out / "common_words_3500.txt", make_words(3500))
        write(out / "words_10000.txt", make_words(10000))


if __name__ == "__main__":
    main()
