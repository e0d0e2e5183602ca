// The JSON reader: good input into the expected DOM, bad input into an error with its offset.
#include "json_reader.hpp"

#include <gtest/gtest.h>

#include <string>

namespace hmmkit::hmmctl::json {
namespace {

TEST(JsonReader, ParsesEveryType) {
  Value v;
  std::string error;
  ASSERT_TRUE(Parse(R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"\\\/\n\u00e9\ud83d\ude00",
                        "o": {"k": {}}, "e": []} )",
                    &v, &error))
      << error;
  ASSERT_TRUE(v.is_object());
  const Value* a = v.Find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->items.size(), 5U);
  EXPECT_EQ(a->items[0].number, 1);
  EXPECT_EQ(a->items[1].number, -2500);
  EXPECT_TRUE(a->items[2].boolean);
  EXPECT_EQ(a->items[3].type, Type::kBool);
  EXPECT_FALSE(a->items[3].boolean);
  EXPECT_EQ(a->items[4].type, Type::kNull);
  EXPECT_EQ(v.StringAt("s"), "x\"\\/\n\xc3\xa9\xf0\x9f\x98\x80");
  ASSERT_NE(v.Find("o"), nullptr);
  EXPECT_TRUE(v.Find("o")->Find("k")->is_object());
  EXPECT_TRUE(v.Find("e")->is_array());
  EXPECT_EQ(v.Find("missing"), nullptr);
  EXPECT_EQ(v.NumberAt("s", 7), 7);  // not a number: the fallback
}

TEST(JsonReader, WriteReadsBack) {
  Value v;
  std::string error;
  const std::string text = R"({"n":1234567890123,"f":0.1,"s":"a\"b","a":[{},[]],"t":true})";
  ASSERT_TRUE(Parse(text, &v, &error)) << error;
  EXPECT_EQ(Write(v), text);
  Value again;
  ASSERT_TRUE(Parse(Write(v, 2), &again, &error)) << error;
  EXPECT_EQ(Write(again), text);
}

struct Bad {
  const char* text;
  size_t offset;
};

TEST(JsonReader, BadInputGivesTheOffset) {
  const Bad cases[] = {
      {"", 0},         {"{", 1},       {"{\"a\" 1}", 5},   {"[1,]", 3},        {"[1 2]", 3},
      {"\"abc", 4},    {"tru", 0},     {"01", 1},          {"1.", 2},          {"-", 1},
      {"1e", 2},       {"\"\\x\"", 2}, {"\"\\u12g4\"", 5}, {"\"\\ud800\"", 7}, {"{} x", 3},
      {"\"a\nb\"", 2}, {"[1e999]", 1}, {"{\"a\":}", 5},    {"nul", 0},         {"[\"\\udc00\"]", 8},
  };
  for (const Bad& c : cases) {
    Value v;
    std::string error;
    EXPECT_FALSE(Parse(c.text, &v, &error)) << c.text;
    EXPECT_EQ(error.rfind("offset " + std::to_string(c.offset) + ":", 0), 0U)
        << "input: " << c.text << "  error: " << error;
  }
}

TEST(JsonReader, DeepNestingIsAnErrorNotACrash) {
  const std::string deep(100000, '[');
  Value v;
  std::string error;
  EXPECT_FALSE(Parse(deep, &v, &error));
  EXPECT_NE(error.find("nesting deeper than"), std::string::npos) << error;
  // Within the limit it parses.
  const std::string ok = std::string(kMaxDepth, '[') + std::string(kMaxDepth, ']');
  EXPECT_TRUE(Parse(ok, &v, &error)) << error;
}

TEST(JsonReader, StreamsTheNamedArray) {
  Value root;
  std::string error;
  std::vector<double> seen;
  auto on_item = [&](const Value& item, size_t, std::string*) {
    seen.push_back(item.NumberAt("x"));
    return true;
  };
  ASSERT_TRUE(ParseStreaming(R"({"head":1,"list":[{"x":1},{"x":2},{"x":3}],"tail":"t"})", "list",
                             on_item, &root, &error))
      << error;
  EXPECT_EQ(seen, (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(root.Find("list"), nullptr);  // streamed, not stored
  EXPECT_EQ(root.NumberAt("head"), 1);
  EXPECT_EQ(root.StringAt("tail"), "t");
}

TEST(JsonReader, StreamingCallbackErrorCarriesTheItemOffset) {
  Value root;
  std::string error;
  auto on_item = [](const Value& item, size_t, std::string* err) {
    if (item.NumberAt("x") == 2) {
      *err = "two is not allowed";
      return false;
    }
    return true;
  };
  const std::string text = R"({"list":[{"x":1},{"x":2}]})";
  EXPECT_FALSE(ParseStreaming(text, "list", on_item, &root, &error));
  EXPECT_EQ(
      error.rfind("offset " + std::to_string(text.find("{\"x\":2")) + ": two is not allowed", 0),
      0U)
      << error;
}

}  // namespace
}  // namespace hmmkit::hmmctl::json
