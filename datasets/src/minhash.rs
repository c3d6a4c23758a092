//! Near-duplicate detection: MinHash signatures of word shingles and locality-sensitive hashing.
//!
//! Exact dedup (ids are content hashes) misses the same paragraph pasted into two notes with a word
//! changed, or a file copied with its header edited. Here each text becomes the set of its 5-word
//! shingles (lowercased words, punctuation and whitespace ignored, so reformatting does not matter); a
//! signature keeps, for each of 128 hash functions, the smallest hash over the set. The share of equal
//! entries between two signatures estimates the Jaccard similarity of the two sets. LSH cuts the
//! signature into 16 bands of 8 rows: texts that agree on a whole band become candidates (pairs at
//! Jaccard 0.8 do so with probability 1 − (1 − 0.8⁸)¹⁶ ≈ 0.94), and a candidate counts as a duplicate only
//! when its estimated similarity reaches the threshold. As in datatrove and text-dedup.
//!
//! Hashes are fixed functions of the text (no per-run randomness), so signatures can be stored with the
//! dataset and compared across days.

use std::collections::HashMap;

pub const PERMUTATIONS: usize = 128;
const BANDS: usize = 16;
const ROWS: usize = PERMUTATIONS / BANDS;
/// Words per shingle.
pub const SHINGLE_WORDS: usize = 5;

/// 128 minimum hashes; `SIGNATURE_BYTES` little-endian bytes when stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub [u32; PERMUTATIONS]);

pub const SIGNATURE_BYTES: usize = PERMUTATIONS * 4;

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({:08x}…)", self.0[0])
    }
}

/// The multipliers and offsets of the hash family `h_i(x) = (a_i·x + b_i) >> 32` over 32-bit x,
/// drawn once from a fixed splitmix64 stream.
struct Family {
    a: [u64; PERMUTATIONS],
    b: [u64; PERMUTATIONS],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

static FAMILY: std::sync::LazyLock<Family> = std::sync::LazyLock::new(|| {
    let mut state = 0x5041_495F_4D48_0001; // "PAI_MH" and a version: changing it invalidates stored signatures.
    let mut f = Family {
        a: [0; PERMUTATIONS],
        b: [0; PERMUTATIONS],
    };
    for i in 0..PERMUTATIONS {
        f.a[i] = splitmix64(&mut state) | 1;
        f.b[i] = splitmix64(&mut state);
    }
    f
});

/// FNV-1a of a word, lowercased (ASCII).
fn word_hash(word: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in word {
        h ^= u64::from(c.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hashes of the words of `text`: runs of alphanumeric characters (and `_`, and any non-ASCII byte,
/// so words in other scripts count too).
pub fn word_hashes(text: &str) -> Vec<u64> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 5);
    let mut start = None;
    for (i, &c) in bytes.iter().enumerate() {
        let in_word = c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        match (in_word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(word_hash(&bytes[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(word_hash(&bytes[s..]));
    }
    out
}

/// 32-bit hashes of the `n`-word shingles of a list of word hashes (one shingle of all the words when
/// there are fewer than `n`).
pub fn shingles(words: &[u64], n: usize) -> impl Iterator<Item = u64> + '_ {
    let n = n.clamp(1, words.len().max(1));
    words.windows(n).map(|w| {
        let mut state = w.len() as u64;
        for &h in w {
            state = (state ^ h)
                .rotate_left(27)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        splitmix64(&mut state)
    })
}

impl Signature {
    /// The signature of a text, or `None` when it has fewer words than one shingle (such texts are
    /// left to exact dedup).
    pub fn of(text: &str) -> Option<Self> {
        let words = word_hashes(text);
        if words.len() < SHINGLE_WORDS {
            return None;
        }
        let f = &*FAMILY;
        let mut min = [u32::MAX; PERMUTATIONS];
        for s in shingles(&words, SHINGLE_WORDS) {
            let x = (s ^ (s >> 32)) & 0xFFFF_FFFF;
            for ((m, a), b) in min.iter_mut().zip(&f.a).zip(&f.b) {
                *m = (*m).min((a.wrapping_mul(x).wrapping_add(*b) >> 32) as u32);
            }
        }
        Some(Signature(min))
    }

    /// The estimated Jaccard similarity of the two shingle sets.
    pub fn similarity(&self, other: &Signature) -> f64 {
        let same = self.0.iter().zip(&other.0).filter(|(a, b)| a == b).count();
        same as f64 / PERMUTATIONS as f64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// `None` unless `bytes` is exactly one stored signature.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != SIGNATURE_BYTES {
            return None;
        }
        let mut out = [0u32; PERMUTATIONS];
        for (v, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Some(Signature(out))
    }

    fn band_keys(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.0.chunks_exact(ROWS).enumerate().map(|(band, rows)| {
            let mut state = band as u64;
            for &r in rows {
                state = (state ^ u64::from(r)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            (band, splitmix64(&mut state))
        })
    }
}

/// An LSH index over signatures: which stored texts a new one nearly duplicates.
pub struct NearDupIndex<K> {
    threshold: f64,
    buckets: HashMap<(usize, u64), Vec<usize>>,
    entries: Vec<(K, Signature)>,
}

impl<K: Clone> NearDupIndex<K> {
    /// `threshold`: the estimated Jaccard similarity from which two texts are duplicates.
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            buckets: HashMap::new(),
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, key: K, signature: Signature) {
        let at = self.entries.len();
        for band in signature.band_keys() {
            self.buckets.entry(band).or_default().push(at);
        }
        self.entries.push((key, signature));
    }

    /// The most similar stored text at or above the threshold, with its similarity.
    pub fn find(&self, signature: &Signature) -> Option<(K, f64)> {
        let mut best: Option<(usize, f64)> = None;
        for band in signature.band_keys() {
            for &at in self.buckets.get(&band).into_iter().flatten() {
                let s = self.entries[at].1.similarity(signature);
                if s >= self.threshold && best.is_none_or(|(_, b)| s > b) {
                    best = Some((at, s));
                }
            }
        }
        best.map(|(at, s)| (self.entries[at].0.clone(), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(seed: u64, n: usize) -> Vec<String> {
        let mut s = seed;
        (0..n)
            .map(|_| format!("w{}", splitmix64(&mut s) % 5000))
            .collect()
    }

    fn exact_jaccard(a: &str, b: &str) -> f64 {
        use std::collections::HashSet;
        let set = |t: &str| -> HashSet<u64> { shingles(&word_hashes(t), SHINGLE_WORDS).collect() };
        let (x, y) = (set(a), set(b));
        x.intersection(&y).count() as f64 / x.union(&y).count() as f64
    }

    #[test]
    fn the_estimate_follows_the_true_jaccard_similarity() {
        let base = words(1, 400);
        for changed in [0usize, 4, 10, 25, 60, 150] {
            let mut other = base.clone();
            let fresh = words(99 + changed as u64, changed);
            for (k, w) in fresh.into_iter().enumerate() {
                let at = (k * 397) % other.len();
                other[at] = w;
            }
            let (a, b) = (base.join(" "), other.join(" "));
            let (sa, sb) = (Signature::of(&a).unwrap(), Signature::of(&b).unwrap());
            let (est, truth) = (sa.similarity(&sb), exact_jaccard(&a, &b));
            // 128 permutations: standard error sqrt(J(1-J)/128) ≤ 0.045.
            assert!(
                (est - truth).abs() < 0.15,
                "changed {changed}: {est} vs {truth}"
            );
        }
    }

    #[test]
    fn formatting_and_case_do_not_matter_and_short_texts_have_none() {
        let a = "fn add(a: i32, b: i32) -> i32 { a + b } // Adds two numbers together";
        let b = "fn  add( a:i32,\n    b:i32 )->i32 {\n    a+b\n}\n// adds TWO numbers together";
        assert_eq!(Signature::of(a), Signature::of(b));
        assert!(Signature::of("only four words here").is_none());
        let s = Signature::of(a).unwrap();
        assert_eq!(Signature::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Signature::from_bytes(&[0; 5]), None);
    }

    #[test]
    fn the_index_finds_near_copies_and_not_unrelated_texts() {
        let mut index = NearDupIndex::new(0.8);
        let docs: Vec<String> = (0..200).map(|i| words(i, 300).join(" ")).collect();
        for (i, d) in docs.iter().enumerate() {
            index.insert(i, Signature::of(d).unwrap());
        }
        // One word in a hundred changed: found, and the right one.
        let mut near = words(17, 300);
        for k in (0..300).step_by(100) {
            near[k] = "changed".into();
        }
        let (hit, sim) = index
            .find(&Signature::of(&near.join(" ")).unwrap())
            .unwrap();
        assert_eq!(hit, 17);
        assert!(sim >= 0.8, "{sim}");
        // Half the words changed, or a text never seen: nothing.
        let mut half = words(23, 300);
        for k in (0..300).step_by(2) {
            half[k] = format!("x{k}");
        }
        assert!(index
            .find(&Signature::of(&half.join(" ")).unwrap())
            .is_none());
        assert!(index
            .find(&Signature::of(&words(5000, 300).join(" ")).unwrap())
            .is_none());
    }
}
